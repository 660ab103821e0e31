"""The producer side of the outbox: enqueue a task inside the caller's transaction.

The row and the NOTIFY commit (or roll back) with the caller's business rows: that is the
whole point. NOTIFY is sent from here rather than from a trigger, as River does, so it costs
one statement only where a task is enqueued.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson

from shared.connections import DbConn
from shared.constants import DEFAULT_QUEUE, NOTIFY_CHANNEL

# The row and the relays' wake-up in one statement (one round trip). The NOTIFY payload is
# empty: listeners only need a wake-up, and equal NOTIFYs in one transaction fold into one.
# Payload and headers go as JSON text, so that any connection takes them, not only those
# of create_pool() (which decode jsonb to Python objects).
_INSERT = """
WITH event AS (
    INSERT INTO outbox (event_id, task_type, queue, payload, headers, available_at)
    VALUES ($1, $2, $3, $4::text::jsonb, $5::text::jsonb, COALESCE($6, now()))
    RETURNING id
)
SELECT pg_notify($7, '') FROM event
"""


async def enqueue(
    conn: DbConn,
    task_type: str,
    payload: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    queue: str = DEFAULT_QUEUE,
    available_at: datetime | None = None,
    event_id: uuid.UUID | None = None,
) -> uuid.UUID:
    """Insert an outbox row and notify the relays; must run inside a transaction.

    TypeError (orjson's JSONEncodeError) for a payload or headers JSON cannot carry: a
    non-string key, an integer beyond 64 bits, a lone surrogate."""
    if not conn.is_in_transaction():
        raise RuntimeError("enqueue() must run inside the transaction of the business write")
    # The envelope carries both as JSON objects; anything else could never be decoded
    # (the table refuses it too: sql/002_outbox_json_objects.sql).
    if not isinstance(payload, dict) or not isinstance(headers or {}, dict):
        raise TypeError("enqueue() takes the payload and the headers as dicts")
    event_id = event_id or uuid.uuid4()
    await conn.execute(
        _INSERT,
        event_id,
        task_type,
        queue,
        orjson.dumps(payload).decode(),
        orjson.dumps(headers or {}).decode(),
        available_at,
        NOTIFY_CHANNEL,
    )
    return event_id


def dead_letter_error(reason: str, error: str) -> str:
    """The `last_error` of a dead-lettered outbox row: the dead letter's reason and error,
    bounded (the worker writes it; `outboxctl` writes it back when a replay is undone)."""
    return f"{reason}: {error}"[:2000]
