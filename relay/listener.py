"""LISTEN for the outbox channel on a dedicated connection and wake the relay.

Notifications sent while the connection is down are lost, so after every (re)connect the
relay is woken once to catch up; the relay's own poll covers anything else.

An idle LISTEN connection sends nothing, so a peer that vanished without a reset (a
failover, a partition) would leave it looking open for ever, every wake-up falling back to
the poll. The listener asks the server a trivial question every few seconds and reconnects
when no answer comes in time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from relay import metrics
from shared.constants import NOTIFY_CHANNEL
from shared.lifecycle import Loop

logger = logging.getLogger(__name__)


class Listener(Loop):
    name = "listener"
    idle_interval = 1.0  # how often the connection's health is checked

    def __init__(
        self,
        dsn: str,
        on_notify: Callable[[], None],
        *,
        ping_every: float = 5.0,
        ping_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        self.dsn = dsn
        self.on_notify = on_notify
        self.ping_every = ping_every
        self.ping_timeout = ping_timeout
        self._conn: asyncpg.Connection[Any] | None = None
        self._pinged = 0.0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    def _notified(self, *_args: object) -> None:
        self.on_notify()

    async def run_once(self) -> bool:
        if self.connected:
            await self._ping_when_due()
            return False
        if self._conn is not None:
            metrics.ERRORS.labels("listener_disconnected").inc()
            logger.warning("listener_disconnected")
            self._conn = None
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            await conn.add_listener(NOTIFY_CHANNEL, self._notified)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._pinged = time.monotonic()
        logger.info("listener_connected", extra={"channel": NOTIFY_CHANNEL})
        self.on_notify()  # catch up on what was committed while we were not listening
        return False

    async def _ping_when_due(self) -> None:
        conn = self._conn
        if conn is None or time.monotonic() - self._pinged < self.ping_every:
            return
        try:
            await conn.fetchval("SELECT 1", timeout=self.ping_timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            logger.warning("listener_unresponsive", extra={"error": type(e).__name__})
            conn.terminate()  # connected turns False: the next iteration reconnects
            return
        self._pinged = time.monotonic()

    async def stop(self, grace: float = 10.0) -> None:
        await super().stop(grace)
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await conn.close(timeout=grace)
