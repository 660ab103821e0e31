"""LISTEN for the outbox channel on a dedicated connection and wake the relay.

Notifications sent while the connection is down are lost, so after every (re)connect the
relay is woken once to catch up; the relay's own poll covers anything else.
"""

from __future__ import annotations

import logging
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

    def __init__(self, dsn: str, on_notify: Callable[[], None]) -> None:
        super().__init__()
        self.dsn = dsn
        self.on_notify = on_notify
        self._conn: asyncpg.Connection[Any] | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    def _notified(self, *_args: object) -> None:
        self.on_notify()

    async def run_once(self) -> bool:
        if self.connected:
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
        logger.info("listener_connected", extra={"channel": NOTIFY_CHANNEL})
        self.on_notify()  # catch up on what was committed while we were not listening
        return False

    async def stop(self, grace: float = 10.0) -> None:
        await super().stop(grace)
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await conn.close(timeout=grace)
