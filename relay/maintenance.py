"""The relay's slow loop: backlog gauges, reconciliation with Redis, and retention.

It runs on the relay's pool, whose commits are asynchronous (relay.__main__): a purge a
Postgres crash undoes is simply done again.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from relay import metrics
from relay.reconciler import Reconciler
from relay.retention import purge_completed
from relay.settings import RelaySettings
from shared.lifecycle import Loop

# Counting stops here, so the gauge query costs the same however large the backlog is.
BACKLOG_COUNT_CAP = 100_000

# A row the relay failed to publish (Redis refused it) and has not published since, and
# not given up on; served by outbox_refused_idx (sql/005, whose predicate lacks the last
# condition), and used by outboxctl status too.
REFUSED_ROWS = "published_at IS NULL AND last_error IS NOT NULL AND dead_lettered_at IS NULL"

# The oldest wait: of a row due, since it became due; of a row the relay failed to
# publish, since it was created, because each failure moves its available_at on (a row
# Redis refuses for ever would otherwise never look older than its backoff, and no alert
# would see it). (A delayed task's row that Redis refuses counts its delay too: the row's
# first due time is not kept.)
_BACKLOG = f"""
SELECT
  (SELECT count(*) FROM (SELECT 1 FROM outbox
                         WHERE published_at IS NULL AND dead_lettered_at IS NULL
                         LIMIT $1) AS capped) AS backlog,
  (SELECT extract(epoch FROM now() - available_at) FROM outbox
   WHERE published_at IS NULL AND available_at <= now() AND dead_lettered_at IS NULL
   ORDER BY available_at LIMIT 1) AS oldest_due,
  (SELECT extract(epoch FROM now() - created_at) FROM outbox WHERE {REFUSED_ROWS}
   ORDER BY created_at LIMIT 1) AS oldest_refused
"""  # noqa: S608 - built from constants, no input


async def refresh_backlog_gauges(pool: asyncpg.Pool[Any]) -> tuple[int, float]:
    row = await pool.fetchrow(_BACKLOG, BACKLOG_COUNT_CAP)
    assert row is not None
    backlog = int(row["backlog"])
    oldest = max(float(row["oldest_due"] or 0.0), float(row["oldest_refused"] or 0.0))
    metrics.BACKLOG.set(backlog)
    metrics.OLDEST_AGE.set(oldest)
    return backlog, oldest


class Maintenance(Loop):
    name = "relay-maintenance"
    # A pass deletes at most this many batches of expired rows; one that deleted that many
    # runs again at once, so retention keeps up with any rate of completions.
    purge_batch = 1000
    purge_max_batches = 10

    def __init__(
        self, pool: asyncpg.Pool[Any], reconciler: Reconciler, settings: RelaySettings
    ) -> None:
        super().__init__()
        self.pool = pool
        self.reconciler = reconciler
        self.settings = settings
        self.idle_interval = settings.maintenance_interval_seconds

    async def run_once(self) -> bool:
        """One pass; True (run again at once) while the reconciler finds lost events on
        full pages (after Redis lost its data, a page per interval would take hours to
        work through a large backlog in flight), or the purge deleted all it may in one
        pass (at one pass per interval, completions faster than that would outrun it)."""
        # Each step runs whatever the others do: with Redis down the reconciler fails, and
        # the gauges and the retention (Postgres only) must go on.
        failures: list[Exception] = []
        republished = purged = 0

        async def reconcile() -> None:
            nonlocal republished
            republished = await self.reconciler.run_once()

        async def purge() -> None:
            nonlocal purged
            purged = await purge_completed(
                self.pool,
                self.settings.retention_seconds,
                batch=self.purge_batch,
                max_batches=self.purge_max_batches,
            )

        for step in (lambda: refresh_backlog_gauges(self.pool), reconcile, purge):
            try:
                await step()
            except Exception as e:
                failures.append(e)
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise ExceptionGroup("relay maintenance steps failed", failures)
        purge_full = purged >= self.purge_batch * self.purge_max_batches
        return (republished > 0 and self.reconciler.more) or purge_full
