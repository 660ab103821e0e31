"""The worker's slow loop: queue gauges, stream trimming, and removal of gone consumers."""

from __future__ import annotations

import logging
from typing import Any

from shared.constants import RETRY_PARKING_CONSUMER
from shared.lifecycle import Loop
from worker_service import metrics
from worker_service.queue import StreamQueue

logger = logging.getLogger(__name__)


async def refresh_gauges(queue: StreamQueue) -> dict[str, float]:
    """A handful of Redis calls, however long the stream is: four, and one per consumer
    (up to STATS_PENDING_SCAN of its pending entries) for the oldest pending age."""
    stats = await queue.stats()
    metrics.STREAM_LENGTH.set(stats["stream_length"])
    metrics.PENDING.set(stats["pending"])
    metrics.OLDEST_PENDING_AGE.set(stats["oldest_pending_age"])
    metrics.GROUP_LAG.set(stats["lag"])
    metrics.DEAD_LETTERS.set(stats["dead_letters"])
    metrics.CONSUMERS.set(stats["consumers"])
    return stats


async def remove_gone_consumers(queue: StreamQueue, idle_seconds: float, me: str) -> list[str]:
    """Delete consumers that hold nothing and have not read for idle_seconds.

    A consumer with pending entries is never deleted (that would drop its entries from the
    group's pending list); a live consumer deleted by mistake is recreated by its next read.
    """
    client: Any = queue.redis
    removed = []
    for c in await client.xinfo_consumers(queue.stream, queue.group):
        name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
        if name in (me, RETRY_PARKING_CONSUMER) or int(c["pending"]):
            continue
        if int(c["idle"]) >= idle_seconds * 1000:
            await client.xgroup_delconsumer(queue.stream, queue.group, name)
            removed.append(name)
    if removed:
        logger.info("consumers_removed", extra={"consumers": removed})
    return removed


class WorkerMaintenance(Loop):
    name = "worker-maintenance"

    def __init__(self, queue: StreamQueue, consumer: str, idle_cleanup: float, interval: float):
        super().__init__()
        self.queue = queue
        self.consumer = consumer
        self.idle_cleanup = idle_cleanup
        self.idle_interval = interval

    async def run_once(self) -> bool:
        await self.queue.trim_acknowledged()
        await remove_gone_consumers(self.queue, self.idle_cleanup, self.consumer)
        await refresh_gauges(self.queue)
        return False
