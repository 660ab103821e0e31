"""The default app's handler: exactly one usable email per event, whatever is redelivered."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from devstack import mail as devstack_mail
from devstack.postgres import PostgresServer
from devstack.redis import RedisServer
from devstack.smtp_sink import SmtpSink, stored
from relay.publisher import RelayLoop
from shared.connections import DbConn, close_pool, create_pool
from shared.constants import TASK_SEND_VERIFY_EMAIL, dead_letter_key
from shared.envelope import Envelope
from shared.errors import ConfigError, PermanentError, RetryableError
from shared.lifecycle import FINISH_UNCUT_SECONDS
from shared.outbox import enqueue
from shared.verification import hash_code
from tests.helpers import (
    eventually,
    link_params,
    relay_settings,
    text_part,
    verify_link,
    worker_settings,
)
from worker_service import app as verify_app
from worker_service.consumer import Worker
from worker_service.mailer import Mailer, SmtpConfig
from worker_service.router import Router, TaskContext


@pytest.fixture
async def state(smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("SMTP_URL", smtp_sink.url)
    monkeypatch.setenv("PUBLIC_BASE_URL", "http://signup.test")
    monkeypatch.setenv("MAIL_FROM", "Signup <no-reply@signup.test>")
    st: dict[str, Any] = {}
    for hook in verify_app.router.startup_hooks:
        await hook(st)
    return st


async def add_user(pool: asyncpg.Pool[Any], name: str = "alice") -> None:
    await pool.execute(
        "INSERT INTO users (username, full_name, email, hashed_password) VALUES ($1, $2, $3, 'x')",
        name,
        f"{name.title()} Liddell",
        f"{name}@example.com",
    )


def context(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    state: dict[str, Any],
    event_id: str,
    username: str = "alice",
    attempt: int = 1,
) -> TaskContext:
    env = Envelope(event_id, TASK_SEND_VERIFY_EMAIL, {"username": username}, datetime.now(UTC))
    return TaskContext(env, attempt, "1-0", pool, redis, state)


async def send_new_event(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any]
) -> None:
    """Run the handler for a new event of alice's (a signup's email, or a resend)."""
    await verify_app.send_verify_email(context(pool, redis, state, str(uuid.uuid4())))


@contextlib.asynccontextmanager
async def account_lock_held(pool: asyncpg.Pool[Any], username: str) -> AsyncIterator[Any]:
    """Another send for the account holds its lock until the block ends (a rollback)."""
    async with pool.acquire() as holder:
        tx = holder.transaction()
        await tx.start()
        await holder.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))", verify_app._SEND_LOCK, username
        )
        try:
            yield holder
        finally:
            await tx.rollback()


async def test_sends_one_multipart_email_with_a_working_code(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any], smtp_sink: SmtpSink
) -> None:
    await add_user(pool)
    event_id = str(uuid.uuid4())
    await verify_app.send_verify_email(context(pool, redis, state, event_id))
    (msg,) = smtp_sink.messages()
    assert msg["To"] == "Alice Liddell <alice@example.com>"
    assert msg["From"] == "Signup <no-reply@signup.test>"
    assert msg["Date"] is not None
    assert msg.is_multipart()
    assert {p.get_content_type() for p in msg.iter_parts()} == {"text/plain", "text/html"}
    link = verify_link(msg)
    assert link.startswith("http://signup.test/v1/verify_email?")
    params = link_params(link)
    row = await pool.fetchrow("SELECT * FROM verify_emails WHERE id = $1", int(params["email_id"]))
    assert row is not None
    assert bytes(row["secret_code_hash"]) == hash_code(params["secret_code"])
    assert row["sent_at"] is not None
    assert msg["Message-ID"] == f"<verify-email.{row['id']}.{event_id}@signup.test>"
    # Only the hash is stored: the code itself is nowhere in the database.
    assert params["secret_code"] not in str(dict(row))
    assert "15 minutes" in text_part(msg)


async def test_the_dev_mailbox_tool_finds_the_link_that_a_grep_does_not(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    state: dict[str, Any],
    smtp_sink: SmtpSink,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A name beyond ASCII makes the text quoted-printable ("email_id=3D12", lines cut
    with "="): the README's grep found nothing. `python -m devstack.mail` reads it as a
    mail client does. With "<" and "," in that name, the To header names one address."""
    await pool.execute(
        "INSERT INTO users (username, full_name, email, hashed_password)"
        " VALUES ('jose', 'José <attacker@evil.test>, Núñez', 'jose@example.com', 'x')"
    )
    await add_user(pool)
    await verify_app.send_verify_email(context(pool, redis, state, str(uuid.uuid4()), "jose"))
    await verify_app.send_verify_email(context(pool, redis, state, str(uuid.uuid4())))
    jose, alice = smtp_sink.messages()
    # One address: formataddr() made "José" one and attacker@evil.test another.
    assert [(a.display_name, a.addr_spec) for a in jose["To"].addresses] == [
        ("José attacker evil test Núñez", "jose@example.com")
    ]
    (raw,) = [p for p in smtp_sink.directory.glob("*.eml") if b"jose@" in p.read_bytes()]
    assert verify_link(jose) not in raw.read_text()  # what a grep of the file misses
    assert devstack_mail.main(["--dir", str(smtp_sink.directory), "--to", "Jose@example.com"]) == 0
    assert capsys.readouterr().out == verify_link(jose) + "\n"
    assert devstack_mail.main(["--dir", str(smtp_sink.directory)]) == 0  # the newest
    assert capsys.readouterr().out == verify_link(alice) + "\n"
    assert devstack_mail.main(["--dir", str(smtp_sink.directory), "--to", "bob@example.com"]) == 1
    assert "no verification email to bob@example.com" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name",
    [
        "Bob <attacker@evil.test>, " + "y" * 70,  # folded: the quotes were dropped
        "José <attacker@evil.test>, Núñez",  # an encoded word, then the rest unquoted
        "<" * 100,
        ("ab, " * 30)[:100],
        "\\" * 100,
        'O"Brien, Ö',
        "名前 " * 30,
        # RFC 2047 encoded words, which the standard library decodes when it writes the
        # header: an address, and a line break with a Reply-To (found by review).
        "=?utf-8?q?Bob_=3Cattacker=40evil=2Etest=3E=2C?=",
        "=?utf-8?q?x=0D=0AReply-To=3A_a=40evil=2Etest=0D=0AX-A=3A?=",
        "=?utf-8?b?eA0KUmVwbHktVG86IGFAZXZpbC50ZXN0DQpYLUE6?=",
        "==??utf-8?q?x=0D=0AReply-To=3A_a=40evil=2Etest?=",
    ],
)
def test_the_to_header_names_one_address_whatever_the_name(name: str) -> None:
    cfg = verify_app.VerifyEmailSettings(
        SMTP_URL="smtp://localhost", PUBLIC_BASE_URL="http://x.test"
    )
    msg = verify_app.build_message(
        cfg,
        to="bob@example.com",
        full_name=name,
        link="http://x.test/l",
        message_id=1,
        event_id="e",
    )
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    (address,) = parsed["To"].addresses
    assert address.addr_spec == "bob@example.com"
    assert parsed["Reply-To"] is None
    assert [k for k in parsed if k.lower().startswith("x-")] == []
    assert name in text_part(msg)  # the text greets the person with the name as given


async def test_redelivery_after_success_sends_nothing(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any], smtp_sink: SmtpSink
) -> None:
    await add_user(pool)
    event_id = str(uuid.uuid4())
    await verify_app.send_verify_email(context(pool, redis, state, event_id))
    await verify_app.send_verify_email(context(pool, redis, state, event_id, attempt=2))
    assert len(smtp_sink.messages()) == 1
    assert await pool.fetchval("SELECT count(*) FROM verify_emails") == 1


async def test_concurrent_deliveries_of_one_event_serialise_on_postgres(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any], smtp_sink: SmtpSink
) -> None:
    await add_user(pool)
    event_id = str(uuid.uuid4())
    smtp_sink.handler.delay_seconds = 0.3  # the first send is slow: the second must wait
    await asyncio.gather(
        *(verify_app.send_verify_email(context(pool, redis, state, event_id)) for _ in range(4))
    )
    assert len(smtp_sink.messages()) == 1


async def test_a_new_event_for_the_same_user_sends_a_new_email(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any], smtp_sink: SmtpSink
) -> None:
    await add_user(pool)
    await send_new_event(pool, redis, state)
    await send_new_event(pool, redis, state)
    assert len(smtp_sink.messages()) == 2


async def test_a_failed_send_leaves_no_record_and_the_retrys_link_works(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any], smtp_sink: SmtpSink
) -> None:
    await add_user(pool)
    event_id = str(uuid.uuid4())
    smtp_sink.handler.fail_with = "451 4.3.0 Try again later"
    with pytest.raises(RetryableError, match="451"):
        await verify_app.send_verify_email(context(pool, redis, state, event_id))
    assert await pool.fetchval("SELECT count(*) FROM verify_emails") == 0
    smtp_sink.handler.fail_with = ""
    await verify_app.send_verify_email(context(pool, redis, state, event_id, attempt=2))
    (msg,) = smtp_sink.messages()
    params = link_params(verify_link(msg))
    row = await pool.fetchrow("SELECT * FROM verify_emails WHERE id = $1", int(params["email_id"]))
    assert row is not None and row["sent_at"] is not None
    assert bytes(row["secret_code_hash"]) == hash_code(params["secret_code"])


async def test_a_send_whose_outcome_was_lost_is_sent_again_with_a_new_link_and_message_id(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any], smtp_sink: SmtpSink
) -> None:
    """The server took the message but its reply never came (or the worker died before
    its commit): the record rolls back, and the retry's email carries a new link and a
    new Message-ID. With the same Message-ID a mailbox that drops repeats (Gmail) would
    keep only the first email, whose link no longer works."""

    class ReplyLost(Mailer):
        async def send(
            self, message: EmailMessage, then: Callable[[], Awaitable[None]] | None = None
        ) -> None:
            await super().send(message)  # taken, and its record never made
            raise ConnectionResetError("connection reset after DATA")

    await add_user(pool)
    event_id = str(uuid.uuid4())
    mailer = state["mailer"]
    state["mailer"] = ReplyLost(mailer.config)
    with pytest.raises(ConnectionResetError):
        await verify_app.send_verify_email(context(pool, redis, state, event_id))
    state["mailer"] = mailer
    await verify_app.send_verify_email(context(pool, redis, state, event_id, attempt=2))
    first, second = smtp_sink.messages()
    assert first["Message-ID"] != second["Message-ID"]
    (row,) = await pool.fetch("SELECT id, secret_code_hash FROM verify_emails")
    dead, works = link_params(verify_link(first)), link_params(verify_link(second))
    assert int(works["email_id"]) == row["id"]
    assert bytes(row["secret_code_hash"]) == hash_code(works["secret_code"])
    assert int(dead["email_id"]) != row["id"]


async def test_smtp_refusing_connections_is_retryable(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any]
) -> None:
    from devstack.procs import free_port

    await add_user(pool)
    state["mailer"] = Mailer(SmtpConfig.from_url(f"smtp://127.0.0.1:{free_port()}", 2))
    with pytest.raises(RetryableError, match="SMTP unavailable"):
        await send_new_event(pool, redis, state)


async def test_permanent_smtp_rejection_is_permanent(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any], smtp_sink: SmtpSink
) -> None:
    await add_user(pool)
    smtp_sink.handler.fail_with = "550 5.1.1 No such mailbox"
    with pytest.raises(PermanentError, match="550"):
        await send_new_event(pool, redis, state)


async def test_an_address_only_smtputf8_could_carry_is_permanent(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any], smtp_sink: SmtpSink
) -> None:
    """A row from before the API refused such addresses: no retry could ever send it, so it
    goes to the dead letters at once instead of failing on every attempt."""
    await add_user(pool)
    await pool.execute("UPDATE users SET email = 'jos\u00e9@example.com'")
    with pytest.raises(PermanentError, match="SMTPUTF8"):
        await send_new_event(pool, redis, state)
    assert smtp_sink.messages() == []


async def test_an_internationalized_domain_is_sent_in_its_ascii_form(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any], smtp_sink: SmtpSink
) -> None:
    await add_user(pool)
    await pool.execute("UPDATE users SET email = 'alice@b\u00fccher.de'")
    await send_new_event(pool, redis, state)
    (msg,) = smtp_sink.messages()
    assert msg["To"] == "Alice Liddell <alice@xn--bcher-kva.de>"


async def test_a_fractional_link_lifetime_is_kept(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    state: dict[str, Any],
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """VERIFY_EMAIL_TTL_MINUTES=0.5 is 30 seconds, not 0 (every link expired on arrival)."""
    monkeypatch.setenv("VERIFY_EMAIL_TTL_MINUTES", "0.5")
    for hook in verify_app.router.startup_hooks:
        await hook(state)
    await add_user(pool)
    await send_new_event(pool, redis, state)
    lifetime = await pool.fetchval("SELECT expires_at - created_at FROM verify_emails")
    assert 29 <= lifetime.total_seconds() <= 31
    (msg,) = smtp_sink.messages()
    assert "expires in 0.5 minutes" in text_part(msg)


async def test_a_new_email_ends_the_link_of_the_one_before(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any], smtp_sink: SmtpSink
) -> None:
    """A resend's email makes its link the only one that works ("use the link from your
    most recent email"); a redelivery of the same event changes nothing."""
    await add_user(pool)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    await verify_app.send_verify_email(context(pool, redis, state, first))
    await verify_app.send_verify_email(context(pool, redis, state, second))
    await verify_app.send_verify_email(context(pool, redis, state, second))  # redelivered
    usable = await pool.fetch(
        "SELECT event_id::text FROM verify_emails WHERE expires_at > now() AND used_at IS NULL"
    )
    assert [r["event_id"] for r in usable] == [second]
    assert len(smtp_sink.messages()) == 2


async def test_two_sends_for_one_account_at_once_leave_one_working_link(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any], smtp_sink: SmtpSink
) -> None:
    """The signup's email and a resend, both retried when the SMTP server comes back, run
    at once: one after the other per account, so the second ends the first one's link."""
    await add_user(pool)
    smtp_sink.handler.delay_seconds = 0.3
    await asyncio.gather(
        *(
            verify_app.send_verify_email(context(pool, redis, state, str(uuid.uuid4())))
            for _ in range(2)
        )
    )
    # The second SMTP conversation began once the first was recorded: the sink stored them
    # (files named by the time) at least its 0.3 s DATA delay apart, not together. (That
    # two links left usable is likely, not certain, without the account's lock.)
    arrived = [int(path.name.split("-")[0]) for path, _ in stored(smtp_sink.directory)]
    assert len(arrived) == 2
    assert arrived[1] - arrived[0] >= 0.25e9, arrived
    usable = await pool.fetchval(
        "SELECT count(*) FROM verify_emails WHERE expires_at > now() AND used_at IS NULL"
    )
    assert usable == 1


async def test_a_user_verified_while_the_send_waits_for_the_account_gets_no_email(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any], smtp_sink: SmtpSink
) -> None:
    """Another send for the account holds its lock; meanwhile the person verifies through
    that earlier email. The waiting send reads the user once it has the lock: no email."""
    await add_user(pool)
    async with account_lock_held(pool, "alice"):
        send = asyncio.ensure_future(send_new_event(pool, redis, state))
        await asyncio.sleep(0.3)
        await pool.execute("UPDATE users SET is_email_verified = true WHERE username = 'alice'")
    await send
    assert smtp_sink.messages() == []


async def test_a_send_that_waits_too_long_for_the_account_is_retried_and_frees_its_connection(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    state: dict[str, Any],
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(verify_app, "_SEND_LOCK_WAIT_MS", 200)
    await add_user(pool)
    async with account_lock_held(pool, "alice"):
        in_use = pool.get_size() - pool.get_idle_size()
        with pytest.raises(RetryableError, match="being sent"):
            await send_new_event(pool, redis, state)
        assert pool.get_size() - pool.get_idle_size() == in_use  # its connection went back
    assert smtp_sink.messages() == []
    await send_new_event(pool, redis, state)
    assert len(smtp_sink.messages()) == 1


async def test_a_resend_for_a_user_verified_meanwhile_sends_nothing(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any], smtp_sink: SmtpSink
) -> None:
    await add_user(pool)
    await pool.execute("UPDATE users SET is_email_verified = true")
    await send_new_event(pool, redis, state)
    assert smtp_sink.messages() == []
    assert await pool.fetchval("SELECT count(*) FROM verify_emails") == 0


@pytest.mark.parametrize(
    ("stage", "reply", "outcome"),
    [
        ("rcpt", "550 5.1.1 No such mailbox", PermanentError),
        ("data", "554 5.6.0 Message content rejected", PermanentError),
        # About the server or our configuration, not this message: every email would fail.
        ("rcpt", "550 5.7.1 Relaying denied", RetryableError),
        ("mail", "553 5.1.8 Sender address domain does not exist", RetryableError),
        ("mail", "530 5.7.0 Authentication required", RetryableError),
        ("data", "554 5.7.1 Rejected by policy", RetryableError),
        # A server that gives no enhanced status codes (Exim's stock relay refusal): its
        # words say it is our configuration; a plain refusal of the mailbox stays permanent.
        ("rcpt", "550 relay not permitted", RetryableError),
        ("rcpt", "550 Relaying denied", RetryableError),
        ("rcpt", "550 No such user here", PermanentError),
        ("rcpt", "550 5.1.1 No such user (relay.example.com)", PermanentError),
        (
            "rcpt",
            "550 <relay@example.com>: Recipient address rejected: User unknown",
            PermanentError,
        ),
        ("rcpt", "550 No such user relay-team@example.com", PermanentError),
        ("rcpt", "550 User unknown in relay recipient table", PermanentError),
        ("rcpt", "550 #5.1.0 Address rejected relay@x.org", PermanentError),
        ("rcpt", "550 Relay access denied", RetryableError),
    ],
)
async def test_only_refusals_of_this_message_are_permanent(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    state: dict[str, Any],
    smtp_sink: SmtpSink,
    stage: str,
    reply: str,
    outcome: type[Exception],
) -> None:
    await add_user(pool)
    attribute = {"mail": "fail_mail_with", "rcpt": "fail_rcpt_with", "data": "fail_with"}[stage]
    setattr(smtp_sink.handler, attribute, reply)  # the clean fixture resets it
    with pytest.raises(outcome, match=reply[:3]):
        await send_new_event(pool, redis, state)


@pytest.mark.parametrize("address", ["=?utf-8?q?a?=@example.com", "=?x?q?y?=@example.com"])
async def test_an_address_no_header_can_carry_is_given_up_on_at_once(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    state: dict[str, Any],
    smtp_sink: SmtpSink,
    address: str,
) -> None:
    """A mailbox name that reads as an RFC 2047 encoded word is valid to the address
    validator, and the standard library refuses to write it in a To header: no attempt
    could ever send it. The API refuses it now (test_api.py); a row from before is given
    up on at once, not retried for up to an hour."""
    await add_user(pool)
    await pool.execute("UPDATE users SET email = $1", address)
    with pytest.raises(PermanentError, match="cannot be written in a To header"):
        await send_new_event(pool, redis, state)
    assert smtp_sink.messages() == []


async def test_a_links_lifetime_counts_from_the_send(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    state: dict[str, Any],
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The email says the link "expires in N minutes". Counted from the transaction's
    start, it lost the account lock's wait and the SMTP conversation (minutes at worst):
    with a short lifetime the link was dead when the email arrived."""
    monkeypatch.setenv("VERIFY_EMAIL_TTL_MINUTES", "0.05")  # 3 s
    for hook in verify_app.router.startup_hooks:
        await hook(state)
    await add_user(pool)
    async with account_lock_held(pool, "alice"):
        send = asyncio.ensure_future(send_new_event(pool, redis, state))
        await asyncio.sleep(3.5)  # longer than the lifetime, within the lock's 5 s wait
        still_locked_at = await pool.fetchval("SELECT clock_timestamp()")
    await send
    assert len(smtp_sink.messages()) == 1
    row = await pool.fetchrow("SELECT sent_at, expires_at FROM verify_emails")
    assert row is not None
    assert row["sent_at"] > still_locked_at  # the send's time, not its transaction's start
    assert row["expires_at"] - row["sent_at"] == timedelta(seconds=3)


async def test_missing_user_or_payload_is_permanent(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, state: dict[str, Any]
) -> None:
    with pytest.raises(PermanentError, match="does not exist"):
        await verify_app.send_verify_email(context(pool, redis, state, str(uuid.uuid4()), "ghost"))
    env = Envelope(str(uuid.uuid4()), TASK_SEND_VERIFY_EMAIL, {}, datetime.now(UTC))
    with pytest.raises(PermanentError, match="username"):
        await verify_app.send_verify_email(TaskContext(env, 1, "1-0", pool, redis, state))


def test_smtp_url_parsing() -> None:
    c = SmtpConfig.from_url("smtps://user%40x:p%3Ass@mail.example:2465")
    assert (c.host, c.port, c.username, c.password, c.use_tls, c.start_tls) == (
        "mail.example",
        2465,
        "user@x",
        "p:ss",
        True,
        False,
    )
    c = SmtpConfig.from_url("smtp://mailpit:1025?starttls=off")
    assert (c.port, c.use_tls, c.start_tls, c.username) == (1025, False, False, None)
    assert SmtpConfig.from_url("smtp://m?starttls=require").start_tls is True
    assert SmtpConfig.from_url("smtp://m").port == 25
    assert SmtpConfig.from_url("smtp://m").start_tls is None  # upgrades when offered
    # With a password, TLS is required: a STARTTLS a man in the middle stripped from the
    # server's answer must not send it in clear. Only an explicit off says otherwise.
    assert SmtpConfig.from_url("smtp://u:p@m").start_tls is True
    assert SmtpConfig.from_url("smtp://u:p@m?starttls=off").start_tls is False
    with pytest.raises(ConfigError, match="starttls='required'"):
        SmtpConfig.from_url("smtp://u:p@m?starttls=required")


async def test_a_password_is_not_sent_to_a_server_that_offers_no_starttls() -> None:
    """The server (or a man in the middle) offers AUTH and no STARTTLS: the send fails,
    retried, and no AUTH command goes out."""
    seen: list[str] = []
    server, port = await scripted_smtp({"EHLO": "250-scripted\r\n250 AUTH PLAIN LOGIN"}, seen)
    message = EmailMessage()
    message["From"] = "a@signup.test"
    message["To"] = "b@example.com"
    message.set_content("hi")
    try:
        mailer = Mailer(SmtpConfig.from_url(f"smtp://user:secret@127.0.0.1:{port}", 5))
        with pytest.raises(RetryableError):
            await mailer.send(message)
    finally:
        server.close()
        await server.wait_closed()
    assert "EHLO" in seen
    assert "AUTH" not in seen


async def scripted_smtp(
    replies: dict[str, str], seen: list[str] | None = None
) -> tuple[asyncio.Server, int]:
    """An SMTP server that answers from a script: the greeting and each verb's reply,
    where a test sets a refusal; anything unscripted is accepted. `seen` collects the
    verbs the client sent."""
    defaults = {
        "greeting": "220 scripted ESMTP",
        "EHLO": "250-scripted\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN",
        "HELO": "250 scripted",
        "QUIT": "221 bye",
    }
    script = {**defaults, **replies}

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(script["greeting"].encode() + b"\r\n")
        while line := await reader.readline():
            verb = line.split(b" ", 1)[0].strip().upper().decode()
            if seen is not None:
                seen.append(verb)
            writer.write(script.get(verb, "250 ok").encode() + b"\r\n")
            await writer.drain()
            if verb == "QUIT" or script["greeting"].startswith("5"):
                break
        writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    ("replies", "query", "auth"),
    [
        ({"greeting": "554 5.3.2 Not accepting connections"}, "", ""),
        ({"EHLO": "550 5.7.1 Go away", "HELO": "550 5.7.1 Go away"}, "", ""),
        ({"STARTTLS": "454 4.7.0 TLS not available"}, "?starttls=require", ""),
        ({"AUTH": "535 5.7.8 Authentication credentials invalid"}, "?starttls=off", "u:p@"),
    ],
    ids=["greeting", "helo", "starttls", "auth"],
)
async def test_refusals_of_the_connection_tls_or_login_are_retried(
    replies: dict[str, str], query: str, auth: str
) -> None:
    """Refusals before the message (greeting, EHLO/HELO, STARTTLS, AUTH) say the server or
    our configuration is wrong for every email: retried, never dead-lettered as permanent."""
    server, port = await scripted_smtp(replies)
    message = EmailMessage()
    message["From"] = "a@signup.test"
    message["To"] = "b@example.com"
    message.set_content("hi")
    try:
        mailer = Mailer(SmtpConfig.from_url(f"smtp://{auth}127.0.0.1:{port}{query}", 5))
        code = next(iter(replies.values()))[:3]  # the scripted refusal, not any failure
        with pytest.raises(RetryableError, match=f"SMTP {code}"):
            await mailer.send(message)
    finally:
        server.close()
        await server.wait_closed()


# -- a cancellation while the server takes the message --------------------------------------


def verify_router(timeout: float) -> Router:
    """The default app's handler, its timeout (60 s) shortened."""
    router = Router()
    router.on_startup(verify_app._startup)
    router.handler(TASK_SEND_VERIFY_EMAIL, timeout=timeout)(verify_app.send_verify_email)
    return router


@pytest.fixture
async def signup_event(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    pg_server: PostgresServer,
    redis_server: RedisServer,
    state: dict[str, Any],
) -> str:
    """alice signs up; her event is on the stream. Its id."""
    await add_user(pool)
    async with pool.acquire() as conn, conn.transaction():
        event_id = str(await enqueue(conn, TASK_SEND_VERIFY_EMAIL, {"username": "alice"}))
    relay = RelayLoop(pool, redis, relay_settings(pg_server, redis_server))
    while await relay.run_once():
        pass
    return event_id


@pytest.fixture
def make_verify_worker(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    pg_server: PostgresServer,
    redis_server: RedisServer,
) -> Callable[..., Worker]:
    def make(
        router: Router = verify_app.router,
        name: str = "w1",
        on: asyncpg.Pool[Any] | None = None,
        **settings: Any,
    ) -> Worker:
        cfg = worker_settings(pg_server, redis_server, consumer_name=name, **settings)
        return Worker(router, on or pool, redis, cfg)

    return make


async def one_recorded_email(pool: asyncpg.Pool[Any], smtp_sink: SmtpSink, event_id: str) -> None:
    async def completed() -> bool:
        done = await pool.fetchval(
            "SELECT completed_at IS NOT NULL FROM outbox WHERE event_id = $1", event_id
        )
        return bool(done)

    await eventually(completed, timeout=20)
    (msg,) = smtp_sink.messages()
    params = link_params(verify_link(msg))
    row = await pool.fetchrow("SELECT * FROM verify_emails WHERE id = $1", int(params["email_id"]))
    assert row is not None and row["sent_at"] is not None  # its link is the one that works
    assert bytes(row["secret_code_hash"]) == hash_code(params["secret_code"])


def slow_to_answer(smtp_sink: SmtpSink, command: str, seconds: float) -> None:
    """The sink takes the message, then answers DATA (or QUIT) `seconds` late."""
    if command == "DATA":
        smtp_sink.handler.answer_delay_seconds = seconds
    else:
        smtp_sink.handler.quit_delay_seconds = seconds


@pytest.mark.parametrize("slow", ["DATA", "QUIT"])
async def test_a_timeout_while_the_server_takes_the_message_sends_one_email(
    slow: str,
    pool: asyncpg.Pool[Any],
    smtp_sink: SmtpSink,
    signup_event: str,
    make_verify_worker: Callable[..., Worker],
) -> None:
    """The handler's timeout (here 1 s) fires while the server answers DATA (it may have
    taken the message) or QUIT (it has), on the event's only attempt: the send is recorded
    before the cancellation takes effect, and counts as done. Cancelled there, each
    attempt sent an email no one recorded, whose link did not work, and the event ended
    dead-lettered; once the record waited, a timeout on the last attempt still
    dead-lettered an email sent and recorded."""
    slow_to_answer(smtp_sink, slow, 2.0)
    worker = make_verify_worker(verify_router(timeout=1), max_attempts=1)
    await worker.start()
    try:
        await one_recorded_email(pool, smtp_sink, signup_event)
    finally:
        await worker.stop()


@pytest.mark.parametrize("slow", ["DATA", "QUIT"])
async def test_a_stop_while_the_server_takes_the_message_sends_one_email(
    slow: str,
    pool: asyncpg.Pool[Any],
    pg_server: PostgresServer,
    smtp_sink: SmtpSink,
    signup_event: str,
    make_verify_worker: Callable[..., Worker],
) -> None:
    """A rolling restart's SIGTERM, its grace (0.5 s) over while the server takes the
    message: slow to answer DATA, the send gets 5 s more to be recorded before the
    process closes its pool as main() does (a stop that gave it 0.5 s as to any handler
    had its connection closed under it, and the next worker sent a second email); slow to
    answer QUIT, the send is recorded already and the connection closed at once."""
    slow_to_answer(smtp_sink, slow, 3.0)
    own = await create_pool(pg_server.dsn, max_size=2)
    first = make_verify_worker(on=own)
    await first.start()

    async def taken() -> bool:
        return len(smtp_sink.messages()) == 1

    await eventually(taken, timeout=10)
    t0 = time.monotonic()
    await first.stop(grace=0.5)
    await close_pool(own, 0.5)
    took = time.monotonic() - t0
    slow_to_answer(smtp_sink, slow, 0.0)
    second = make_verify_worker(name="w2")
    await second.start()
    try:
        await one_recorded_email(pool, smtp_sink, signup_event)
    finally:
        await second.stop()
    assert took < 0.5 + 0.5 + FINISH_UNCUT_SECONDS + 2, f"the stop took {took:.1f} s"


class SlowRelease:
    """The pool, but its connections take `seconds` to be handed back: the release comes
    after the email is sent and recorded, and a timeout or a stop can land in it."""

    def __init__(self, pool: asyncpg.Pool[Any], seconds: float) -> None:
        self._pool = pool
        self._seconds = seconds
        self.cut = 0  # hand-backs a cancellation landed in

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[DbConn]:
        conn = await self._pool.acquire()
        try:
            yield conn
        finally:
            try:
                await asyncio.sleep(self._seconds)
            except asyncio.CancelledError:
                self.cut += 1
                raise
            finally:
                await asyncio.shield(self._pool.release(conn))


async def test_a_timeout_after_the_send_while_the_connection_goes_back_counts_it_done(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    smtp_sink: SmtpSink,
    signup_event: str,
    make_verify_worker: Callable[..., Worker],
) -> None:
    """The handler's timeout (1 s) fires while its connection goes back to the pool (2 s
    here), on the event's only attempt, after the email was sent and its record committed:
    the run counts as done. It counted as timed out, and the event was dead-lettered with
    its email delivered (a replay would then send nothing)."""
    slow = SlowRelease(pool, 2.0)
    worker = make_verify_worker(verify_router(timeout=1), on=slow, max_attempts=1)
    await worker.start()
    try:
        await one_recorded_email(pool, smtp_sink, signup_event)
    finally:
        await worker.stop()
    assert slow.cut == 1  # the timeout came where this test puts it, not in the send
    assert await redis.xlen(dead_letter_key()) == 0
    dead = await pool.fetchval(
        "SELECT dead_lettered_at FROM outbox WHERE event_id = $1", signup_event
    )
    assert dead is None
