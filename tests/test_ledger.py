"""The delivery ledger the fault tests and `make chaos` rest their proof on: which emails
count as usable, which users as lost, what counts as a duplicate."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from devstack import ledger
from devstack.postgres import PostgresServer
from shared.verification import hash_code
from worker_service import app as verify_app

CFG = verify_app.VerifyEmailSettings(SMTP_URL="smtp://localhost", PUBLIC_BASE_URL="http://x.test")


async def add_user(pool: asyncpg.Pool[Any], username: str, email: str) -> None:
    await pool.execute(
        "INSERT INTO users (username, full_name, email, hashed_password)"
        " VALUES ($1, 'Someone', $2, 'not a hash')",
        username,
        email,
    )


async def add_record(
    pool: asyncpg.Pool[Any], username: str, code: str, *, sent: bool = True
) -> int:
    email_id: int = await pool.fetchval(
        "INSERT INTO verify_emails (username, email, secret_code_hash, event_id, expires_at,"
        " sent_at) SELECT username, email, $2, $3, now() + interval '15 minutes',"
        " CASE WHEN $4 THEN now() END FROM users WHERE username = $1 RETURNING id",
        username,
        hash_code(code),
        uuid.uuid4(),
        sent,
    )
    return email_id


def mail(directory: Path, to: str, email_id: int, code: str) -> None:
    """An email as the SMTP sink stores it (its file named by the time it arrived)."""
    link = f"http://x.test/v1/verify_email?email_id={email_id}&secret_code={code}"
    msg = verify_app.build_message(
        CFG, to=to, full_name="Someone", link=link, message_id=email_id, event_id="e"
    )
    (directory / f"{time.time_ns()}-{uuid.uuid4().hex}.eml").write_bytes(msg.as_bytes())


async def test_the_ledger_counts_only_emails_whose_link_works(
    pool: asyncpg.Pool[Any], pg_server: PostgresServer, tmp_path: Path
) -> None:
    users = {
        "ok": "ok@example.com",  # one usable email
        "wrongcode": "wrongcode@example.com",  # its link's code is not the record's
        "unsent": "unsent@example.com",  # its record was never marked sent
        "norecord": "norecord@example.com",  # its record is gone (rolled back)
        "dup": "dup@example.com",  # a usable email, and one whose record is gone
        "twice": "twice@example.com",  # two usable emails: what must never happen
        "mixed": "Mixed.Case@Example.com",  # the address as typed at signup
        "nomail": "nomail@example.com",  # nothing arrived
    }
    for username, email in users.items():
        await add_user(pool, username, email)
    mail(tmp_path, "ok@example.com", await add_record(pool, "ok", "c-ok"), "c-ok")
    wrong = await add_record(pool, "wrongcode", "c-right")
    mail(tmp_path, "wrongcode@example.com", wrong, "c-wrong")
    unsent = await add_record(pool, "unsent", "c-unsent", sent=False)
    mail(tmp_path, "unsent@example.com", unsent, "c-unsent")
    mail(tmp_path, "norecord@example.com", 999_999, "c-none")
    mail(tmp_path, "dup@example.com", 999_998, "c-gone")
    mail(tmp_path, "dup@example.com", await add_record(pool, "dup", "c-dup"), "c-dup")
    for code in ("c-t1", "c-t2"):
        mail(tmp_path, "twice@example.com", await add_record(pool, "twice", code), code)
    mail(tmp_path, "mixed.case@example.com", await add_record(pool, "mixed", "c-mix"), "c-mix")

    conn = await asyncpg.connect(pg_server.dsn)
    try:
        led = await ledger.compute(conn, tmp_path)
    finally:
        await conn.close()

    assert led.committed == 8
    assert led.emails == 9
    assert led.delivered == 4  # ok, dup, twice, mixed
    assert sorted(led.lost_users) == ["nomail", "norecord", "unsent", "wrongcode"]
    assert led.lost == 4
    assert led.duplicated == 2  # dup's unusable one, and twice's second
    assert led.extra_usable == 1  # twice
    assert led.dead_lettered == 0 and led.unfinished == 0
    assert 0 <= led.worst_delay_seconds < 60
