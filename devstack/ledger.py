"""The delivery ledger: what was committed against what was delivered, read from Postgres
and the SMTP sink's mailbox. Used by the fault tests and by `make chaos`.

An email is *usable* when its link names a verification record whose stored hash matches
the code in the link and which was recorded as sent. A second email for the same event can
only come from a crash between the SMTP send and the commit that records it; its record
was rolled back, so at most one email per user is usable.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from devstack.mail import mailbox
from shared.verification import hash_code


@dataclass
class Mail:
    to: str
    email_id: int
    code: str
    received_at: datetime


@dataclass
class Ledger:
    committed: int = 0
    emails: int = 0
    delivered: int = 0  # users with exactly one usable email
    lost: int = 0  # committed users with no usable email
    duplicated: int = 0  # emails beyond the first for one user
    extra_usable: int = 0  # users with more than one usable email (must stay 0)
    dead_lettered: int = 0
    unfinished: int = 0  # outbox rows neither completed nor dead-lettered
    worst_delay_seconds: float = 0.0
    lost_users: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("signups committed", self.committed),
            ("emails delivered (usable)", self.delivered),
            ("emails sent in all", self.emails),
            ("lost", self.lost),
            ("duplicated", self.duplicated),
            ("users with two usable emails", self.extra_usable),
            ("dead-lettered", self.dead_lettered),
            ("outbox rows unfinished", self.unfinished),
            ("worst delay, commit to mail (s)", f"{self.worst_delay_seconds:.2f}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def read_mailbox(directory: Path) -> list[Mail]:
    mails = []
    for m in mailbox(directory):
        q = {k: v[0] for k, v in parse_qs(urlsplit(m.link).query).items()}
        ns = int(m.path.name.split("-", 1)[0])
        mails.append(
            Mail(m.to, int(q["email_id"]), q["secret_code"], datetime.fromtimestamp(ns / 1e9, UTC))
        )
    return mails


async def compute(conn: asyncpg.Connection[Any], mail_dir: Path) -> Ledger:
    users = {
        r["email"].lower(): (r["username"], r["created_at"])
        for r in await conn.fetch("SELECT username, email, created_at FROM users")
    }
    records = {
        r["id"]: r
        for r in await conn.fetch("SELECT id, email, secret_code_hash, sent_at FROM verify_emails")
    }
    mails = read_mailbox(mail_dir)
    by_user: dict[str, list[Mail]] = defaultdict(list)
    for mail in mails:
        by_user[mail.to].append(mail)
    led = Ledger(committed=len(users), emails=len(mails))
    for addr, (username, created_at) in users.items():
        got = by_user.get(addr, [])
        usable = [
            m
            for m in got
            if (rec := records.get(m.email_id)) is not None
            and rec["sent_at"] is not None
            and bytes(rec["secret_code_hash"]) == hash_code(m.code)
        ]
        if not usable:
            led.lost += 1
            led.lost_users.append(username)
            continue
        led.delivered += 1
        led.duplicated += len(got) - 1
        led.extra_usable += len(usable) > 1
        first = min(m.received_at for m in got)
        led.worst_delay_seconds = max(led.worst_delay_seconds, (first - created_at).total_seconds())
    led.dead_lettered = await conn.fetchval(
        "SELECT count(*) FROM outbox WHERE dead_lettered_at IS NOT NULL"
    )
    led.unfinished = await conn.fetchval(
        "SELECT count(*) FROM outbox WHERE completed_at IS NULL AND dead_lettered_at IS NULL"
    )
    return led
