"""The default application: the verification email sent after a signup.

Run with `python -m worker_service --app worker_service.app:router`.

The handler is idempotent. Its effect record is the verify_emails row keyed by the event
id: a delivery inserts it (or finds it) and locks it, so two deliveries of one event at the
same moment serialise on Postgres; the one that comes second finds `sent_at` set and does
nothing. The mail is sent while the row is locked and `sent_at` commits right after the
server's answer to DATA, before QUIT; a cancellation in between (the handler's timeout, a
stop) waits for that commit. So a second email can only come from a crash (or a reply lost)
between the SMTP send and that commit; that one carries a new link, which works, and a new
Message-ID. A worker sends at most DB_POOL_SIZE
emails at once: each send holds its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from html import escape
from typing import Any
from urllib.parse import urlencode

import asyncpg
from asyncpg.transaction import Transaction
from pydantic import Field
from pydantic_settings import BaseSettings

from shared import settings as settings_mod
from shared.addresses import ascii_address
from shared.connections import DbConn
from shared.constants import TASK_SEND_VERIFY_EMAIL
from shared.errors import PermanentError, RetryableError
from shared.lifecycle import spend_cancellation
from shared.settings import SETTINGS_CONFIG, HttpUrl, SmtpUrl
from shared.verification import hash_code, new_code
from worker_service.mailer import Mailer, SmtpConfig
from worker_service.router import Router, TaskContext

logger = logging.getLogger(__name__)

router = Router()

# The first key of the advisory lock a send takes per account (the second is the username's
# hash): a constant of its own, apart from the migrations' lock. A delivery waits for it at
# most _SEND_LOCK_WAIT_MS, then gives its pooled connection back and is retried.
_SEND_LOCK = 727_002
_SEND_LOCK_WAIT_MS = 5_000
# The verification handler's timeout, and the longest SMTP_TIMEOUT_SECONDS taken.
SEND_TIMEOUT_SECONDS = 60
SMTP_TIMEOUT_MAX_SECONDS = 100
# The replies a send waits for once its message is under way, each within
# SMTP_TIMEOUT_SECONDS, where the handler's timeout waits for them instead of cutting
# them short (Mailer.send): MAIL FROM, RCPT TO, DATA's 354, the final reply, and RSET
# after a refusal.
SMTP_WAITS_UNCUT = 5


class VerifyEmailSettings(BaseSettings):
    model_config = SETTINGS_CONFIG

    smtp_url: SmtpUrl = Field(alias="SMTP_URL")
    mail_from: str = Field("Signup <no-reply@example.com>", alias="MAIL_FROM")
    public_base_url: HttpUrl = Field(alias="PUBLIC_BASE_URL")
    verify_ttl_minutes: float = Field(15.0, gt=0, le=43_200, alias="VERIFY_EMAIL_TTL_MINUTES")
    # Bounded so that a send's transaction, idle while the SMTP server answers (up to the
    # handler's timeout, then up to SMTP_WAITS_UNCUT replies of up to this long each),
    # ends within WORKER_IDLE_IN_TRANSACTION_SECONDS: past that, Postgres ends the session,
    # and an email sent would be rolled back and sent again.
    smtp_timeout_seconds: float = Field(
        20.0, gt=0, le=SMTP_TIMEOUT_MAX_SECONDS, alias="SMTP_TIMEOUT_SECONDS"
    )


def build_message(
    cfg: VerifyEmailSettings,
    *,
    to: str,
    full_name: str,
    link: str,
    message_id: int,
    event_id: str,
) -> EmailMessage:
    """`message_id`: the verification record's id, one per link. A second email for one
    event (a crash between the send and its commit rolled the first record back) carries
    a new link and so a new Message-ID: mail systems that drop a repeated Message-ID (as
    Gmail does) would otherwise keep the first email, whose link no longer works. The event
    id beside it keeps the Message-ID unique beyond this database (a restore, staging and
    production sending from one domain)."""
    sender_domain = parseaddr(cfg.mail_from)[1].rpartition("@")[2] or "localhost"
    msg = EmailMessage()
    msg["From"] = cfg.mail_from
    msg["To"] = Address(display_name=header_name(full_name), addr_spec=to)
    msg["Subject"] = "Confirm your email address"
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = f"<verify-email.{message_id}.{event_id}@{sender_domain}>"
    minutes = f"{cfg.verify_ttl_minutes:g}"
    text = (
        f"Hello {full_name},\n\n"
        f"Please confirm your email address by opening this link:\n\n{link}\n\n"
        f"The link works once and expires in {minutes} minutes.\n"
        "If you did not sign up, ignore this message.\n"
    )
    html = (
        '<!doctype html><html><body style="font-family:sans-serif">\n'
        f"<p>Hello {escape(full_name)},</p>\n"
        "<p>Please confirm your email address:</p>\n"
        f'<p><a href="{escape(link)}">Confirm my email address</a></p>\n'
        f"<p>The link works once and expires in {minutes} minutes.\n"
        "If you did not sign up, ignore this message.</p>\n"
        "</body></html>\n"
    )
    # 7bit when the text allows it, so the link reads as it is in the raw message.
    msg.set_content(text, cte=_cte(text))
    msg.add_alternative(html, subtype="html", cte=_cte(html))
    return msg


# What a display name may not carry into the To header (RFC 5322's specials, whitespace).
_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."\s]+')
HEADER_NAME_MAX = 64


def header_name(full_name: str) -> str:
    """The name as the To header shows it: RFC 5322's specials replaced by spaces, the
    opening of an RFC 2047 encoded word ("=?") broken up, at most HEADER_NAME_MAX
    characters. The API takes "<", "," and quotes in a name, and the standard library's
    header folding drops the quotes around a long display name (3.11), so
    "Bob <attacker@evil.test>, yyy…" came out as two addresses, the first an attacker's,
    for a mail client to show. It also decodes an ASCII encoded word as it writes the
    header, so "=?utf-8?q?x=0D=0AReply-To=3A_…?=" became a line break and a Reply-To of
    the sender's choosing. The email's text greets the person with the name as given.
    """
    name = _SPECIALS.sub(" ", full_name).replace("=?", "= ?")
    return name.strip()[:HEADER_NAME_MAX].strip()


def _cte(body: str) -> str:
    return "7bit" if body.isascii() else "quoted-printable"


def _configure() -> tuple[VerifyEmailSettings, Mailer]:
    cfg = settings_mod.load(VerifyEmailSettings)
    return cfg, Mailer(SmtpConfig.from_url(cfg.smtp_url, cfg.smtp_timeout_seconds))


router.on_config_check(_configure)


@router.on_startup
async def _startup(state: dict[str, Any]) -> None:
    state["verify_settings"], state["mailer"] = _configure()


@router.handler(TASK_SEND_VERIFY_EMAIL, timeout=SEND_TIMEOUT_SECONDS)
async def send_verify_email(ctx: TaskContext) -> None:
    cfg: VerifyEmailSettings = ctx.state["verify_settings"]
    mailer: Mailer = ctx.state["mailer"]
    username = ctx.payload.get("username")
    if not isinstance(username, str):
        raise PermanentError("payload has no username")
    finished = False
    try:
        async with ctx.pool.acquire() as conn:
            # Committed by the send's record, before QUIT (Mailer.send); rolled back otherwise.
            tx = conn.transaction()
            await tx.start()
            try:
                email_id = await _send_in(tx, conn, ctx, cfg, mailer, username)
                finished = True
            finally:
                # Not over a connection gone (a pool closed at exit): its failure would
                # hide the error or cancellation that brought the handler here.
                with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
                    if conn.is_in_transaction():
                        await tx.rollback()
    except asyncio.CancelledError:
        if not finished:
            raise
        # The email is sent and recorded (or none was needed); only the connection's
        # hand-back was left, which the pool completes under a shield. A timeout or a
        # stop landing there must not count the run failed: on the last attempt that
        # dead-lettered an email delivered.
        spend_cancellation()
    if email_id is not None:
        logger.info("verify_email_sent", extra={"event_id": ctx.event_id, "email_id": email_id})


async def _send_in(
    tx: Transaction,
    conn: DbConn,
    ctx: TaskContext,
    cfg: VerifyEmailSettings,
    mailer: Mailer,
    username: str,
) -> int | None:
    """The send, in transaction `tx`; the email's id, or None if none was needed."""
    # One send at a time per account (the signup's email and a resend both retried when
    # the SMTP server comes back): each sees the one before it, committed, and ends its
    # link below, so only the last email's link works. An advisory lock, not a row lock
    # on users, so that nothing else waits on it. A send that waits longer than
    # _SEND_LOCK_WAIT_MS gives its connection back and is retried.
    await conn.execute(f"SET LOCAL lock_timeout = {int(_SEND_LOCK_WAIT_MS)}")
    try:
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _SEND_LOCK, username)
    except asyncpg.LockNotAvailableError:
        raise RetryableError("another email to this account is being sent") from None
    await conn.execute("SET LOCAL lock_timeout TO DEFAULT")
    # Read under the lock: a person who verified through the email sent while this
    # delivery waited gets no other. (The INSERT below takes a key-share lock on the
    # user's row, for its foreign key: an ALTER TABLE users waits for the send;
    # migrations give up such a wait after a few seconds and try again.)
    user = await conn.fetchrow(
        "SELECT full_name, email, is_email_verified FROM users WHERE username = $1",
        username,
    )
    if user is None:
        raise PermanentError("user does not exist")
    if user["is_email_verified"]:
        # Verified through an earlier email while this one (a resend) waited.
        logger.info("verify_email_not_needed", extra={"event_id": ctx.event_id})
        return None
    code = new_code()
    ttl_seconds = cfg.verify_ttl_minutes * 60  # make_interval(mins =>) takes whole minutes
    await conn.execute(
        """
        INSERT INTO verify_emails (username, email, secret_code_hash, event_id, expires_at)
        VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
        ON CONFLICT (event_id) DO NOTHING
        """,
        username,
        user["email"],
        hash_code(code),
        ctx.event_id,
        ttl_seconds,
    )
    # Blocks while another delivery of this event holds the row.
    row = await conn.fetchrow(
        "SELECT id, sent_at FROM verify_emails WHERE event_id = $1 FOR UPDATE", ctx.event_id
    )
    assert row is not None
    if row["sent_at"] is not None:
        logger.info("verify_email_already_sent", extra={"event_id": ctx.event_id})
        return None
    # Not sent: then it is the row this transaction inserted, with this code (a row
    # commits only with its sent_at; an attempt that failed left nothing behind).
    link = (
        cfg.public_base_url.rstrip("/")
        + "/v1/verify_email?"
        + urlencode({"email_id": row["id"], "secret_code": code})
    )
    # SMTP without SMTPUTF8 takes ASCII only: an internationalized domain (kept in
    # Unicode) goes in its IDNA form; a mailbox name beyond ASCII, which the API refuses
    # now but a row from before may hold, cannot be sent at all.
    to = ascii_address(user["email"])
    if to is None:
        raise PermanentError(
            "the address cannot be sent to: it needs SMTPUTF8, which is not supported, or"
            " cannot be written in a To header"
        )
    try:
        message = build_message(
            cfg,
            to=to,
            full_name=user["full_name"],
            link=link,
            message_id=row["id"],
            event_id=ctx.event_id,
        )
    except (ValueError, MessageError) as e:  # no retry builds it: given up on at once
        raise PermanentError(f"the message cannot be built: {type(e).__name__}: {e}") from e

    async def record() -> None:
        # The link's lifetime counts from the server's answer to DATA, as the email says
        # ("expires in N minutes"), not from this transaction's start: the account lock's
        # wait and the SMTP conversation come before, minutes at worst, and a short
        # VERIFY_EMAIL_TTL_MINUTES would have the link dead when the email arrives.
        await conn.execute(
            "UPDATE verify_emails SET (sent_at, expires_at) ="
            " (SELECT t, t + make_interval(secs => $2) FROM (SELECT clock_timestamp() AS t) c)"
            " WHERE id = $1",
            row["id"],
            ttl_seconds,
        )
        # The link of the most recent email is the one that works (a resend): the
        # account's other unused links end now.
        await conn.execute(
            "UPDATE verify_emails SET expires_at = now()"
            " WHERE username = $1 AND id <> $2 AND used_at IS NULL AND expires_at > now()",
            username,
            row["id"],
        )
        await tx.commit()

    await mailer.send(message, then=record)
    return int(row["id"])
