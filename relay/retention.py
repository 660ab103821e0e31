"""Delete completed outbox rows after the retention window, in small batches.

Only completed rows are deleted: unpublished, in-flight and dead-lettered rows stay, so
retention can never drop work that has not finished.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from relay import metrics

_PURGE = """
DELETE FROM outbox WHERE id = ANY(ARRAY(
    SELECT id FROM outbox
    WHERE completed_at < now() - make_interval(secs => $1)
    ORDER BY completed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
))
"""


async def purge_completed(
    pool: asyncpg.Pool[Any], retention_seconds: float, *, batch: int = 1000, max_batches: int = 10
) -> int:
    """Delete up to batch * max_batches expired rows, one short transaction per batch."""
    total = 0
    for _ in range(max_batches):
        status = await pool.execute(_PURGE, retention_seconds, batch)
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < batch:
            break
    metrics.PURGED.inc(total)
    return total
