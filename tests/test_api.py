"""The HTTP API against a real Postgres: signup, errors as problems, verification."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import threading
import unicodedata
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from argon2 import PasswordHasher
from prometheus_client import REGISTRY

from api_service.app import create_app
from api_service.passwords import Hasher, HashQueueFull
from api_service.settings import ApiSettings
from devstack.postgres import PostgresServer
from devstack.procs import proc_memory
from shared.connections import create_pool
from shared.constants import NOTIFY_CHANNEL
from shared.logs import ClientMistakes
from shared.migrate import SCHEMA_VERSION, discover, migrate, migrations_dir
from shared.verification import hash_code
from tests.helpers import api_process, settings_of, signup_body

PROBLEM = "application/problem+json"


def cheap_settings(pg_server: PostgresServer, **overrides: Any) -> ApiSettings:
    return settings_of(
        ApiSettings,
        database_url=pg_server.dsn,
        argon2_time_cost=1,
        argon2_memory_kib=1024,
        **overrides,
    )


@contextlib.asynccontextmanager
async def relays_notified(pool: asyncpg.Pool[Any]) -> AsyncIterator[asyncio.Queue[str]]:
    """The payloads of the NOTIFYs the relays would get, as they come."""
    got: asyncio.Queue[str] = asyncio.Queue()

    def heard(*args: Any) -> None:
        got.put_nowait(args[3])

    async with pool.acquire() as conn:
        await conn.add_listener(NOTIFY_CHANNEL, heard)
        try:
            yield got
        finally:
            await conn.remove_listener(NOTIFY_CHANNEL, heard)


async def nothing_more_notified(pool: asyncpg.Pool[Any], got: asyncio.Queue[str]) -> bool:
    """Whether no NOTIFY came since the last one taken: a marker sent now arrives after
    any that committed before it (Postgres delivers them in commit order)."""
    await pool.execute("SELECT pg_notify($1, 'marker')", NOTIFY_CHANNEL)
    return await asyncio.wait_for(got.get(), 5) == "marker"


@pytest.fixture
async def client(
    pool: asyncpg.Pool[Any], pg_server: PostgresServer
) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(cheap_settings(pg_server), pool))) as c:
        yield c


async def test_signup_commits_user_and_outbox_row_together(
    client: TestClient[Any, Any], pool: asyncpg.Pool[Any]
) -> None:
    async with relays_notified(pool) as notified:
        resp = await client.post(
            "/v1/users", json=signup_body(1), headers={"X-Request-ID": "req-42"}
        )
        assert resp.status == 201
        assert await asyncio.wait_for(notified.get(), 5) == ""  # the relays are woken
        assert await nothing_more_notified(pool, notified)
    assert resp.headers["X-Request-ID"] == "req-42"
    assert "Location" not in resp.headers  # nothing serves GET /v1/users/{username}
    body = await resp.json()
    assert body["username"] == "user_1"
    assert body["is_email_verified"] is False
    assert set(body) == {"username", "full_name", "email", "is_email_verified", "created_at"}
    user = await pool.fetchrow("SELECT * FROM users WHERE username = 'user_1'")
    assert user is not None
    assert user["hashed_password"].startswith("$argon2id$")
    assert "correct horse" not in user["hashed_password"]
    rows = await pool.fetch("SELECT * FROM outbox")
    assert len(rows) == 1
    assert rows[0]["task_type"] == "send_verify_email"
    assert rows[0]["payload"] == {"username": "user_1"}  # no secrets in the outbox
    assert rows[0]["headers"] == {"request_id": "req-42"}
    assert rows[0]["published_at"] is None
    assert rows[0]["queue"] == "default"


@contextlib.asynccontextmanager
async def outbox_refused(pool: asyncpg.Pool[Any]) -> AsyncIterator[None]:
    """Every outbox insert fails, for the block."""
    await pool.execute(
        """
        CREATE FUNCTION refuse_outbox() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'outbox refused'; END $$;
        CREATE TRIGGER refuse_outbox BEFORE INSERT ON outbox
            FOR EACH ROW EXECUTE FUNCTION refuse_outbox();
        """
    )
    try:
        yield
    finally:
        await pool.execute("DROP TRIGGER refuse_outbox ON outbox; DROP FUNCTION refuse_outbox()")


@pytest.mark.expect_loop_failures
async def test_a_signup_whose_outbox_row_fails_leaves_no_user(
    client: TestClient[Any, Any], pool: asyncpg.Pool[Any]
) -> None:
    """The user and its outbox row commit together or not at all: with the outbox refusing
    the row, the signup fails and leaves no account behind (which would keep the username
    and address with no email ever owed), and the same signup goes through once it can."""
    async with outbox_refused(pool):
        resp = await client.post("/v1/users", json=signup_body(1))
        assert resp.status == 500
        assert resp.content_type == PROBLEM
        # The cause goes to the log only: the client's problem names no detail of it.
        problem = await resp.json()
        assert set(problem) == {"type", "title", "status", "instance"}, problem
        assert "outbox refused" not in await resp.text()
        assert await pool.fetchval("SELECT count(*) FROM users") == 0
    assert (await client.post("/v1/users", json=signup_body(1))).status == 201
    assert await pool.fetchval("SELECT count(*) FROM users") == 1
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 1


@pytest.mark.expect_loop_failures
async def test_a_resend_whose_outbox_row_fails_changes_nothing(
    client: TestClient[Any, Any], pool: asyncpg.Pool[Any]
) -> None:
    """The account's request time and the outbox row are written together: with the row
    refused, the time stays as it was, so the resend is not held back for the interval
    with no email owed."""
    assert (await client.post("/v1/users", json=signup_body(1))).status == 201
    await pool.execute("UPDATE users SET verify_requested_at = now() - interval '1 hour'")
    before = await pool.fetchval("SELECT verify_requested_at FROM users")
    async with outbox_refused(pool):
        resp = await client.post("/v1/verify_email/resend", json={"email": "user1@example.com"})
        assert resp.status == 500
    assert await pool.fetchval("SELECT verify_requested_at FROM users") == before
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 1
    resp = await client.post("/v1/verify_email/resend", json={"email": "user1@example.com"})
    assert resp.status == 202
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 2


async def test_the_hasher_takes_exactly_its_threads_and_waiting_hashes() -> None:
    """threads + max_waiting hashes in flight, no more: the next is refused at once, and a
    finished hash gives its slot back."""
    hasher = Hasher(time_cost=1, memory_kib=8, parallelism=1, threads=1, max_waiting=2)
    release = threading.Event()

    class Stalled:
        def hash(self, password: str) -> str:
            release.wait(10)
            return f"hashed {password}"

    hasher._ph = Stalled()  # type: ignore[assignment]
    try:
        held = [asyncio.ensure_future(hasher.hash(f"p{i}")) for i in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(HashQueueFull):
            await hasher.hash("one too many")
        release.set()
        assert await asyncio.gather(*held) == ["hashed p0", "hashed p1", "hashed p2"]
        assert await hasher.hash("again") == "hashed again"
    finally:
        release.set()
        hasher.close()


async def test_signups_beyond_the_hash_queue_get_503_at_once_and_the_rest_go_through(
    pool: asyncpg.Pool[Any], pg_server: PostgresServer
) -> None:
    """One hash thread, at most two signups waiting for it: a burst of twelve (each costs
    a full hash, taken name or not) gets 503 with Retry-After for what does not fit,
    instead of queueing for ever behind the others."""
    settings = cheap_settings(pg_server, hash_threads=1).model_copy(
        update={"argon2_time_cost": 4, "argon2_memory_kib": 8192, "max_waiting_hashes": 2}
    )
    async with TestClient(TestServer(create_app(settings, pool))) as c:
        burst = await asyncio.gather(*(c.post("/v1/users", json=signup_body(i)) for i in range(12)))
        statuses = sorted(r.status for r in burst)
        refused = [r for r in burst if r.status == 503]
        assert statuses.count(201) >= 3, statuses
        assert refused, statuses
        assert set(statuses) == {201, 503}
        for r in refused:
            assert r.headers["Retry-After"] == "1"
            assert (await r.json())["type"] == "/problems/overloaded"
        # The queue drained: the next signup is taken.
        assert (await c.post("/v1/users", json=signup_body(99))).status == 201
    created = await pool.fetchval("SELECT count(*) FROM users")
    assert created == statuses.count(201) + 1
    assert await pool.fetchval("SELECT count(*) FROM outbox") == created


async def test_resend_queues_an_email_for_an_unverified_address_at_most_once_per_interval(
    client: TestClient[Any, Any], pool: asyncpg.Pool[Any]
) -> None:
    """202 whatever the address, with the same body, so the answer tells nobody who
    signed up; an outbox row only for an unverified account whose last request (the
    signup, or a resend) is older than API_RESEND_INTERVAL_SECONDS."""
    url = "/v1/verify_email/resend"

    def resends() -> float:
        return REGISTRY.get_sample_value("api_verify_email_resends_total") or 0.0

    before = resends()
    assert (await client.post("/v1/users", json=signup_body(1))).status == 201

    async def events() -> int:
        return int(await pool.fetchval("SELECT count(*) FROM outbox"))

    async def resend(email: str) -> dict[str, Any]:
        resp = await client.post(url, json={"email": email}, headers={"X-Request-ID": "rs-1"})
        assert resp.status == 202
        body: dict[str, Any] = await resp.json()
        return body

    async with relays_notified(pool) as notified:
        accepted = await resend("user1@example.com")
        assert await events() == 1  # the signup was just now: too soon
        assert await nothing_more_notified(pool, notified)
        await pool.execute("UPDATE users SET verify_requested_at = now() - interval '61 seconds'")
        assert await resend("User1@EXAMPLE.com") == accepted  # matched regardless of case
        assert await events() == 2
        assert await asyncio.wait_for(notified.get(), 5) == ""  # the relays are woken
    row = await pool.fetchrow("SELECT * FROM outbox ORDER BY id DESC LIMIT 1")
    assert row is not None
    assert row["task_type"] == "send_verify_email"
    assert row["payload"] == {"username": "user_1"}
    assert row["headers"] == {"request_id": "rs-1"}
    assert await resend("user1@example.com") == accepted
    assert await events() == 2  # asked again at once: nothing more
    assert await resend("nobody@example.com") == accepted
    await pool.execute(
        "UPDATE users SET is_email_verified = true, verify_requested_at = now() - interval '1 hour'"
    )
    assert await resend("user1@example.com") == accepted
    assert await events() == 2  # verified: nothing to send
    bad = await client.post(url, json={"email": "not-an-email"})
    assert bad.status == 422
    assert (await client.post(url, json={"email": "a@example.com", "x": 1})).status == 422
    # Counted alike whatever happened: /metrics must not tell who is registered.
    assert resends() - before == 5


async def test_the_resend_interval_is_the_configured_one(
    pool: asyncpg.Pool[Any], pg_server: PostgresServer
) -> None:
    app = create_app(cheap_settings(pg_server, resend_interval_seconds=5), pool)
    async with TestClient(TestServer(app)) as c:
        assert (await c.post("/v1/users", json=signup_body(1))).status == 201
        await pool.execute("UPDATE users SET verify_requested_at = now() - interval '10 s'")
        resp = await c.post("/v1/verify_email/resend", json={"email": "user1@example.com"})
        assert resp.status == 202
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 2  # 10 s is past 5 s


async def test_signups_go_to_the_configured_queue(
    pool: asyncpg.Pool[Any], pg_server: PostgresServer
) -> None:
    """QUEUE=mail on the API and on a worker: the relay publishes each row to its own
    queue's stream, so the API must write the queue it is configured with."""
    app = create_app(cheap_settings(pg_server, queue="mail"), pool)
    async with TestClient(TestServer(app)) as c:
        assert (await c.post("/v1/users", json=signup_body(1))).status == 201
    assert await pool.fetchval("SELECT queue FROM outbox") == "mail"


async def test_request_id_is_generated_when_absent_or_insane(
    client: TestClient[Any, Any],
) -> None:
    for insane in ("bad id with spaces and /slashes", "a" * 129):
        resp = await client.get("/healthz", headers={"X-Request-ID": insane})
        rid = resp.headers["X-Request-ID"]
        assert len(rid) == 32 and rid.isalnum()
    resp = await client.get("/healthz", headers={"X-Request-ID": "a" * 128})
    assert resp.headers["X-Request-ID"] == "a" * 128


async def test_taken_username_and_email_are_409_and_roll_back(
    client: TestClient[Any, Any], pool: asyncpg.Pool[Any]
) -> None:
    assert (await client.post("/v1/users", json=signup_body(1))).status == 201
    same_name = await client.post("/v1/users", json=signup_body(1, email="other@example.com"))
    assert same_name.status == 409
    assert same_name.content_type == PROBLEM
    assert (await same_name.json())["type"] == "/problems/username-taken"
    same_email = await client.post("/v1/users", json=signup_body(2, email="USER1@example.com"))
    assert same_email.status == 409
    assert (await same_email.json())["type"] == "/problems/email-taken"
    # The failed transactions left no outbox rows behind.
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 1


async def test_malformed_json_is_400(client: TestClient[Any, Any]) -> None:
    twice = b'{"username": "bob", "full_name": "B", "username": "carol"}'
    for raw in (b"{", b"\xff\xfe{}", b"[" * 5000 + b"]" * 5000, b'{"a": NaN}', b"", twice):
        resp = await client.post(
            "/v1/users", data=raw, headers={"Content-Type": "application/json"}
        )
        assert resp.status == 400, raw[:20]
        assert resp.content_type == PROBLEM
        assert (await resp.json())["type"] == "/problems/malformed-json"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decode_is_400_and_logs_no_error(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture, encoding: str
) -> None:
    """Content-Encoding that the body does not match: aiohttp fails while reading it, and
    again while draining it after the answer."""
    resp = await client.post(
        "/v1/users",
        data=b"not compressed at all",
        headers={"Content-Type": "application/json", "Content-Encoding": encoding},
    )
    assert resp.status == 400
    assert resp.content_type == PROBLEM
    assert (await resp.json())["type"] == "/problems/malformed-body"
    await asyncio.sleep(0.05)
    # The services' log setup turns aiohttp's own lines about it into warnings.
    for record in caplog.records:
        if record.name == "aiohttp.server":
            ClientMistakes().filter(record)
        assert record.levelno < logging.ERROR, record.getMessage()


async def test_a_client_gone_in_the_middle_of_its_body_is_no_server_error(
    pg_server: PostgresServer, workdir: Path, clean: None
) -> None:
    """The connection closes after half the body: nobody reads the answer, but the
    request must not be counted as a 500 (the error-rate alert) nor logged as a failure."""
    log = workdir / "gone-mid-body-api.log"
    with api_process(pg_server.dsn, log) as (api, base):
        port = int(base.rsplit(":", 1)[1])
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"username": "half'
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as http:
            metrics = await (await http.get(f"{base}/metrics")).text()
    assert 'status="500"' not in metrics
    text = api.logs()
    assert "request_failed" not in text, text[-2000:]
    assert '"level":"error"' not in text, text[-2000:]


async def test_wrong_content_type_is_415(client: TestClient[Any, Any]) -> None:
    resp = await client.post(
        "/v1/users", data=orjson.dumps(signup_body(1)), headers={"Content-Type": "text/plain"}
    )
    assert resp.status == 415
    assert (await resp.json())["type"] == "/problems/unsupported-media-type"


async def test_body_over_64_kib_is_413(client: TestClient[Any, Any]) -> None:
    big = orjson.dumps(signup_body(1, full_name="x" * 70_000))
    resp = await client.post("/v1/users", data=big, headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert resp.content_type == PROBLEM
    assert (await resp.json())["type"] == "/problems/request-too-large"


@pytest.mark.parametrize(
    ("field", "value", "reason_part"),
    [
        ("username", "ab", "at least 3"),
        ("username", "x" * 33, "at most 32"),
        ("username", "Bad-Name", "pattern"),
        ("username", 12345, "string"),
        ("email", "not-an-email", "email"),
        ("email", "a@b", "email"),
        # Would need SMTPUTF8 from every mail server on the way: never deliverable here.
        ("email", "jos\u00e9@example.com", "before the @ must be ascii"),
        # Valid to the validator, but no To header can carry it: never deliverable either.
        ("email", "=?utf-8?q?a?=@example.com", "encoded word"),
        ("email", "=?x?q?y?=@example.com", "encoded word"),  # CharsetError, not ValueError
        ("email", "Mallory <dave@example.com>", "without a name"),  # EmailStr took it
        ("password", "short", "at least 8"),
        ("password", "p" * 129, "at most 128"),
        ("password", "nul\x00byte-password", "control"),
        ("full_name", "", "at least 1"),
        ("full_name", "x" * 101, "at most 100"),
        ("full_name", "Bob\x00", "control"),
        ("full_name", "Bob\x85", "control"),  # C1: NEXT LINE
        ("full_name", "Bob\u2028Smith", "control"),  # LINE SEPARATOR
        ("full_name", "Bob \u202egnp.exe", "control"),  # RIGHT-TO-LEFT OVERRIDE
        ("password", "pass\u2066word-isolate", "control"),
        # Limits count the normalised text: what is stored and what is hashed.
        ("full_name", "\U0001d160" * 40, "at most 100"),  # NFC: 1 code point to 3
        ("password", "e\u0301" * 4, "at least 8"),  # NFKC: 2 code points to 1
        ("full_name", 10**400, "string"),
    ],
)
async def test_invalid_fields_are_422_naming_the_field(
    client: TestClient[Any, Any], field: str, value: object, reason_part: str
) -> None:
    body = signup_body(1)
    body[field] = value
    resp = await client.post(
        "/v1/users",
        data=orjson.dumps(body) if not isinstance(value, int) else _big_json(body),
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 422
    problem = await resp.json()
    assert problem["type"] == "/problems/validation-error"
    names = {p["name"]: p["reason"] for p in problem["invalid-params"]}
    assert field in names
    assert reason_part.lower() in names[field].lower()
    # The submitted value is never echoed back (it may be a password): not in any text of
    # the problem, as typed or normalised.
    texts = " ".join(_strings(problem))
    if isinstance(value, str) and len(value) >= 4:
        for form in {
            value,
            unicodedata.normalize("NFC", value),
            unicodedata.normalize("NFKC", value),
        }:
            assert form[:50] not in texts, form


def _strings(doc: object) -> list[str]:
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, dict):
        return [t for k, v in doc.items() for t in (*_strings(k), *_strings(v))]
    if isinstance(doc, list):
        return [t for item in doc for t in _strings(item)]
    return []


async def test_names_and_passwords_are_stored_in_one_unicode_form(
    client: TestClient[Any, Any], pool: asyncpg.Pool[Any]
) -> None:
    """A name is kept in NFC (e + combining acute is the é of the other keyboard), and a
    password is hashed in NFKC (NIST SP 800-63B): the same text typed two ways is one."""
    body = signup_body(1)
    body["full_name"] = "Rene\u0301e \u200dZ"  # a zero-width joiner stays
    body["password"] = "\ufb01ne-password-\u2460"  # the fi ligature, a circled one
    resp = await client.post("/v1/users", json=body)
    assert resp.status == 201, await resp.text()
    row = await pool.fetchrow(
        "SELECT full_name, hashed_password FROM users WHERE username = $1", body["username"]
    )
    assert row is not None
    assert row["full_name"] == "Ren\u00e9e \u200dZ"
    assert PasswordHasher().verify(row["hashed_password"], "fine-password-1")


def _big_json(body: dict[str, Any]) -> bytes:
    # orjson refuses integers beyond 64 bits, so write such bodies by hand.
    parts = [
        f'"{k}": {v if isinstance(v, int) else orjson.dumps(v).decode()}' for k, v in body.items()
    ]
    return ("{" + ", ".join(parts) + "}").encode()


async def test_an_internationalized_domain_is_one_mailbox_however_typed(
    client: TestClient[Any, Any], pool: asyncpg.Pool[Any]
) -> None:
    """Stored in Unicode, as EmailStr normalises both forms (and as rows from before this
    check hold it): the ASCII form of the same address is the same mailbox, a 409."""
    resp = await client.post("/v1/users", json={**signup_body(1), "email": "alice@b\u00fccher.de"})
    assert resp.status == 201
    assert (await resp.json())["email"] == "alice@b\u00fccher.de"
    resp = await client.post(
        "/v1/users", json={**signup_body(2), "email": "alice@xn--bcher-kva.de"}
    )
    assert resp.status == 409


async def test_unknown_and_missing_fields_are_422(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/v1/users", json={**signup_body(1), "is_admin": True})
    assert resp.status == 422
    names = {p["name"]: p["reason"] for p in (await resp.json())["invalid-params"]}
    assert names == {"is_admin": "unknown field"}
    resp = await client.post("/v1/users", json={"username": "abc"})
    missing = {p["name"] for p in (await resp.json())["invalid-params"]}
    assert missing == {"full_name", "email", "password"}
    resp = await client.post("/v1/users", json=[1, 2])
    assert resp.status == 422


async def test_strange_inputs_never_500(client: TestClient[Any, Any]) -> None:
    cases: list[bytes] = [
        orjson.dumps(signup_body("'; DROP TABLE users; --")),
        orjson.dumps(signup_body(1, full_name="Robert'); DROP TABLE users;--")),
        orjson.dumps({"username": {"$ne": None}}),
        b'{"username": "a\\u0000b"}',
        b"{" + b'"a":{' * 900 + b"1" + b"}" * 900 + b"}",
        b'"just a string"',
        b"null",
        b"1e999999",
        orjson.dumps(signup_body(2, email="\u202eevil@example.com")),
    ]
    for raw in cases:
        resp = await client.post(
            "/v1/users", data=raw, headers={"Content-Type": "application/json"}
        )
        assert resp.status < 500, raw[:40]
        assert resp.status in (201, 400, 409, 422), raw[:40]
        text = await resp.text()
        assert "Traceback" not in text


async def test_unknown_route_and_method_are_problems(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/nope")
    assert resp.status == 404 and resp.content_type == PROBLEM
    resp = await client.delete("/v1/users")
    assert resp.status == 405 and resp.content_type == PROBLEM


async def _make_code(pool: asyncpg.Pool[Any], code: str, minutes: float = 15) -> int:
    await pool.execute(
        "INSERT INTO users (username, full_name, email, hashed_password) "
        "VALUES ('v_user', 'V', 'v@example.com', 'x')"
    )
    email_id: int = await pool.fetchval(
        "INSERT INTO verify_emails (username, email, secret_code_hash, event_id, expires_at, sent_at)"
        " VALUES ('v_user', 'v@example.com', $1, gen_random_uuid(),"
        " now() + make_interval(mins => $2), now()) RETURNING id",
        hash_code(code),
        minutes,
    )
    return email_id


async def test_verify_email_once(client: TestClient[Any, Any], pool: asyncpg.Pool[Any]) -> None:
    email_id = await _make_code(pool, "good-code")
    wrong = await client.get(
        "/v1/verify_email", params={"email_id": email_id, "secret_code": "bad"}
    )
    assert wrong.status == 400
    assert (await wrong.json())["type"] == "/problems/invalid-verification-code"
    ok = await client.get(
        "/v1/verify_email", params={"email_id": email_id, "secret_code": "good-code"}
    )
    assert ok.status == 200
    assert await ok.json() == {"is_verified": True}
    assert await pool.fetchval("SELECT is_email_verified FROM users WHERE username='v_user'")
    again = await client.get(
        "/v1/verify_email", params={"email_id": email_id, "secret_code": "good-code"}
    )
    assert again.status == 409
    assert (await again.json())["type"] == "/problems/verification-code-used"
    # Used, then past its expiry: still "used" (the address is verified), not "expired".
    await pool.execute("UPDATE verify_emails SET expires_at = now() - interval '1 hour'")
    later = await client.get(
        "/v1/verify_email", params={"email_id": email_id, "secret_code": "good-code"}
    )
    assert later.status == 409


async def test_a_link_ended_while_it_is_clicked_is_expired_not_used(
    client: TestClient[Any, Any], pool: asyncpg.Pool[Any]
) -> None:
    """A newer email ends this link (the worker's UPDATE, not yet committed) while the
    person clicks it: the click waits for it and answers 410, never "already used" for an
    address that is not verified."""
    email_id = await _make_code(pool, "raced-code")
    params: dict[str, str | int] = {"email_id": email_id, "secret_code": "raced-code"}
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("UPDATE verify_emails SET expires_at = now()")
        click = asyncio.ensure_future(client.get("/v1/verify_email", params=params))
        await asyncio.sleep(0.3)
        await tx.commit()
    resp = await click
    assert resp.status == 410
    assert not await pool.fetchval("SELECT is_email_verified FROM users WHERE username='v_user'")


async def test_a_head_request_does_not_use_up_the_link(
    client: TestClient[Any, Any], pool: asyncpg.Pool[Any]
) -> None:
    """Link scanners and unfurlers send HEAD; only the person's GET may use the link."""
    email_id = await _make_code(pool, "head-code")
    params: dict[str, str | int] = {"email_id": email_id, "secret_code": "head-code"}
    head = await client.head("/v1/verify_email", params=params)
    assert head.status == 405
    assert not await pool.fetchval("SELECT is_email_verified FROM users WHERE username='v_user'")
    ok = await client.get("/v1/verify_email", params=params)
    assert ok.status == 200


async def test_verify_email_expired(client: TestClient[Any, Any], pool: asyncpg.Pool[Any]) -> None:
    email_id = await _make_code(pool, "old-code", minutes=-1)
    resp = await client.get(
        "/v1/verify_email", params={"email_id": email_id, "secret_code": "old-code"}
    )
    assert resp.status == 410
    assert not await pool.fetchval("SELECT is_email_verified FROM users WHERE username='v_user'")


async def test_verify_email_bad_params_are_422(client: TestClient[Any, Any]) -> None:
    for params in (
        {},
        {"email_id": "abc", "secret_code": "x"},
        {"email_id": "1"},
        {"email_id": str(2**70), "secret_code": "x"},
        {"email_id": "1", "secret_code": "x" * 500},
    ):
        resp = await client.get("/v1/verify_email", params=params)
        assert resp.status == 422, params


async def test_verify_email_html_for_browsers(
    client: TestClient[Any, Any], pool: asyncpg.Pool[Any]
) -> None:
    email_id = await _make_code(pool, "html-code")
    html = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    ok = await client.get(
        "/v1/verify_email", params={"email_id": email_id, "secret_code": "html-code"}, headers=html
    )
    assert ok.status == 200 and ok.content_type == "text/html"
    assert "Email verified" in await ok.text()
    again = await client.get(
        "/v1/verify_email", params={"email_id": email_id, "secret_code": "html-code"}, headers=html
    )
    assert again.status == 409 and again.content_type == "text/html"
    assert "used already" in await again.text()
    # A client that puts JSON first gets JSON, whatever else it accepts.
    api = {"Accept": "application/json, text/html"}
    answer = await client.get(
        "/v1/verify_email", params={"email_id": email_id, "secret_code": "html-code"}, headers=api
    )
    assert answer.status == 409 and answer.content_type == PROBLEM


async def test_health_ready_metrics_openapi(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/healthz")).status == 200
    assert await (await client.get("/readyz")).json() == {"status": "ready"}
    await client.post("/v1/users", json=signup_body(9))
    metrics = await (await client.get("/metrics")).text()
    assert 'api_http_requests_total{method="POST",route="/v1/users",status="201"}' in metrics
    assert "api_signups_total" in metrics
    # Labels stay bounded: an unknown path is "unmatched", an unknown method "OTHER".
    stray = f"/nope-{uuid.uuid4().hex}"
    assert (await client.get(stray)).status == 404
    assert (await client.request("PROPFIND", "/healthz")).status == 405
    wrong = await client.delete("/v1/users")
    assert wrong.status == 405
    assert "POST" in wrong.headers["Allow"]
    metrics = await (await client.get("/metrics")).text()
    assert stray not in metrics
    assert 'route="unmatched",status="404"' in metrics
    assert 'method="OTHER"' in metrics and "PROPFIND" not in metrics
    doc = await (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    schema = doc["components"]["schemas"]["SignupRequest"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["password"]["maxLength"] == 128


async def test_readyz_is_503_when_postgres_is_down(
    client: TestClient[Any, Any], pg_server: PostgresServer
) -> None:
    pg_server.stop()
    try:
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert resp.content_type == PROBLEM
        assert (await client.get("/healthz")).status == 200
    finally:
        pg_server.start()


async def test_readyz_says_when_the_database_does_not_answer_in_time(
    client: TestClient[Any, Any], pool: asyncpg.Pool[Any], pg_server: PostgresServer
) -> None:
    holder = await asyncpg.connect(pg_server.dsn)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE schema_migrations IN ACCESS EXCLUSIVE MODE")
            resp = await client.get("/readyz")
            assert resp.status == 503
            assert "did not answer within 2 s" in (await resp.json())["detail"]
    finally:
        await holder.close()
    assert (await client.get("/readyz")).status == 200


async def test_readyz_says_when_the_database_refuses_the_query(
    pg_server: PostgresServer, pool: asyncpg.Pool[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A role that may connect but not read schema_migrations (a deployment's mistake)."""
    role = f"noread_{uuid.uuid4().hex[:8]}"
    await pool.execute(f"CREATE ROLE {role} LOGIN")
    limited = await create_pool(pg_server.dsn.replace("postgres@", f"{role}@", 1), max_size=1)
    try:
        async with TestClient(TestServer(create_app(cheap_settings(pg_server), limited))) as c:
            resp = await c.get("/readyz")
            assert resp.status == 503
            detail = (await resp.json())["detail"]
            assert (
                detail == "The database refused the readiness query (InsufficientPrivilegeError)."
            )
        assert any(r.getMessage() == "not_ready" for r in caplog.records)
    finally:
        await limited.close()
        await pool.execute(f"DROP ROLE {role}")


async def test_readyz_is_503_on_a_database_that_takes_no_writes(
    pg_server: PostgresServer, pool: asyncpg.Pool[Any]
) -> None:
    """After a failover DATABASE_URL may reach a standby: it answers the readiness read
    and refuses every signup, so the API must not take traffic there."""
    read_only = await asyncpg.create_pool(
        pg_server.dsn,
        min_size=1,
        max_size=1,
        server_settings={"default_transaction_read_only": "on"},
    )
    assert read_only is not None
    try:
        async with TestClient(TestServer(create_app(cheap_settings(pg_server), read_only))) as c:
            resp = await c.get("/readyz")
            assert resp.status == 503
            assert (await resp.json())["detail"].startswith("The database is read-only")
    finally:
        await read_only.close()


async def test_readyz_is_503_on_a_hot_standby(
    pg_server: PostgresServer, pool: asyncpg.Pool[Any], workdir: Path
) -> None:
    """A real standby, not only a read-only default: its transactions are read-only while
    default_transaction_read_only stays off."""
    standby = pg_server.standby(workdir / "standby" / "data")
    standby.start()
    try:
        on_standby = await create_pool(standby.dsn, max_size=1)
        try:
            assert await on_standby.fetchval("SELECT pg_is_in_recovery()")
            app = create_app(cheap_settings(pg_server), on_standby)
            async with TestClient(TestServer(app)) as c:
                resp = await c.get("/readyz")
                assert resp.status == 503
                assert (await resp.json())["detail"].startswith("The database is read-only")
        finally:
            await on_standby.close()
    finally:
        standby.stop()


def test_the_schema_version_the_api_needs_is_the_last_migration() -> None:
    assert discover(migrations_dir())[-1][0] == SCHEMA_VERSION


async def test_readyz_is_503_until_the_schema_is_migrated(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """A release whose migrations have not run takes no traffic, nor one whose database
    misses one of them; one whose database was migrated further (by the next release) is
    ready."""
    dsn = pg_server.create_database(f"readyz_{uuid.uuid4().hex[:8]}")
    older = tmp_path / "sql"
    older.mkdir()
    for _version, path in discover(migrations_dir())[:-1]:
        (older / path.name).write_text(path.read_text())
    pool = await create_pool(dsn, max_size=2)
    try:
        async with TestClient(TestServer(create_app(cheap_settings(pg_server), pool))) as c:

            async def ready() -> tuple[int, str]:
                resp = await c.get("/readyz")
                return resp.status, await resp.text()

            status, text = await ready()
            assert status == 503
            assert "at version 0;" in text
            await migrate(dsn, older)
            status, text = await ready()
            assert status == 503
            assert f"at version {SCHEMA_VERSION - 1}; this release needs {SCHEMA_VERSION}" in text
            # The next release's migration applied, this one's not: a gap is not ready.
            await pool.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, 'next.sql')",
                SCHEMA_VERSION + 1,
            )
            status, text = await ready()
            assert status == 503
            assert f"at version {SCHEMA_VERSION - 1};" in text
            await migrate(dsn)  # fills the gap; the database is then ahead of this release
            assert await ready() == (200, '{"status": "ready"}')
    finally:
        await pool.close()


def test_the_api_process_does_not_load_redis_py() -> None:
    """Signups never depend on Redis, and redis-py would be 7 MiB of the API's memory."""
    code = (
        "import sys, api_service.__main__; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'redis'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


async def test_the_api_with_default_hashing_stays_under_100_mb(
    pool: asyncpg.Pool[Any], pg_server: PostgresServer, workdir: Path
) -> None:
    """The issue's memory target with the production argon2id parameters (the settings'
    defaults, nothing overridden) on two hash threads hashing at once, as on two CPUs:
    every hash in flight holds its memory, so the defaults must leave room for two. No
    REDIS_URL either: the API never talks to Redis."""
    with api_process(pg_server.dsn, workdir / "rss-api.log", API_HASH_THREADS="2") as (api, base):
        url = f"{base}/v1/users"
        async with aiohttp.ClientSession() as session:

            async def signup(i: int) -> int:
                async with session.post(url, json=signup_body(f"rss_{i}")) as resp:
                    return resp.status

            statuses = await asyncio.gather(*(signup(i) for i in range(16)))
        assert statuses == [201] * 16
        assert api.proc is not None
        peak_mib = proc_memory(api.proc.pid)[1]
    defaults = ApiSettings.model_fields
    stored = await pool.fetchval("SELECT hashed_password FROM users LIMIT 1")
    assert stored.startswith(  # ARGON2_* set in the environment would show up here
        f"$argon2id$v=19$m={defaults['argon2_memory_kib'].default},"
        f"t={defaults['argon2_time_cost'].default},p=1$"
    )
    assert peak_mib * 2**20 < 100_000_000, f"API peak RSS {peak_mib:.0f} MiB"


async def test_a_request_line_the_parser_refuses_is_a_warning_with_no_secret_code(
    pg_server: PostgresServer, workdir: Path, clean: None
) -> None:
    """A link pasted with a byte HTTP does not allow (here an ellipsis) is refused by
    aiohttp's parser before any handler runs. aiohttp logs that as an error whose
    traceback quotes the request line, secret code and all; the link, never used, still
    works. The line must be a warning (the client's mistake) that gives the parser's
    reason and none of the line."""
    log = workdir / "bad-request-line-api.log"
    code = "k3Y-secret-" + uuid.uuid4().hex
    with api_process(pg_server.dsn, log) as (api, base):
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /v1/verify_email?email_id=1&secret_code={code}".encode()
            + "\u2026".encode()
            + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        await writer.drain()
        head = await reader.readline()
        writer.close()
        assert b" 400 " in head, head
        await asyncio.sleep(0.2)
    text = api.logs()
    assert code not in text
    lines = [orjson.loads(line) for line in text.splitlines() if "Error handling request" in line]
    assert len(lines) == 1, text
    assert lines[0]["level"] == "warning"
    assert lines[0]["error"].startswith("InvalidURLError: "), lines[0]["error"]
    assert "secret_code" not in lines[0]["error"]
    assert "exc" not in lines[0]


@pytest.mark.parametrize("framing", ["characters", "none"])
async def test_a_body_the_parser_reads_as_a_request_line_leaves_no_password_in_the_log(
    pg_server: PostgresServer, workdir: Path, clean: None, framing: str
) -> None:
    """A client whose Content-Length counts characters instead of bytes (a name beyond
    ASCII), or that sends none: the body's tail, or all of it, is parsed as the next
    request, and aiohttp's parser quotes it in its error, password included. On a
    connection that has had an answer already (kept alive), aiohttp logs it as an error."""
    password = "hunter2-" + uuid.uuid4().hex
    body = orjson.dumps(
        {
            "username": f"zoe_{framing}",
            "full_name": "Zoë Ångström 李小龍",
            "email": f"zoe_{framing}@example.com",
            "password": password,
        }
    )
    chars = len(body.decode())
    assert len(body) - chars >= 8
    length = f"Content-Length: {chars}\r\n" if framing == "characters" else ""
    log = workdir / f"misframed-{framing}-api.log"
    with api_process(pg_server.dsn, log) as (api, base):
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200 ")
        writer.write(
            b"POST /v1/users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + length.encode()
            + b"\r\n"
            + body
        )
        await writer.drain()
        await asyncio.wait_for(reader.read(), 10)  # until the server closes
        writer.close()
        await asyncio.sleep(0.2)
    text = api.logs()
    lines = [orjson.loads(line) for line in text.splitlines() if "Error handling request" in line]
    assert len(lines) == 1, text
    assert lines[0]["level"] == "warning"
    assert lines[0]["error"].startswith("BadHttpMethod"), lines[0]["error"]
    assert password not in text
    assert "hunter2" not in text
