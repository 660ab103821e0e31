"""A Redis client that sends the commands issued in one event-loop turn as one pipeline.

Sixty-four handlers that each `await redis.incr(key)` cost sixty-four round trips, and
in redis-py each command also pays for a pool checkout, its retry wrapper and its
instrumentation: at thousands of tasks a second that was half of the worker's CPU.
Here a command is queued with a future; the first one in a turn schedules a flush at
the end of the turn, which sends everything queued so far in one non-transactional
pipeline on one connection and hands each caller its own reply or its own error. This is
what ioredis calls auto-pipelining. Measured on the bench machine: 64 concurrent INCRs,
about 3x the throughput of plain redis.asyncio.

Semantics are those of separate commands: no atomicity between callers (use
`pipeline()` / MULTI or a script for that), replies in order per connection. Commands
that block or change the connection's state go straight through the normal path.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

# Blocking commands would hold the whole batch; the rest bind state to a connection.
_DIRECT = frozenset(
    {
        "BLPOP",
        "BRPOP",
        "BRPOPLPUSH",
        "BLMOVE",
        "BLMPOP",
        "BZPOPMIN",
        "BZPOPMAX",
        "BZMPOP",
        "XREAD",
        "XREADGROUP",
        "WAIT",
        "WAITAOF",
        "MULTI",
        "EXEC",
        "DISCARD",
        "WATCH",
        "UNWATCH",
        "SELECT",
        "SUBSCRIBE",
        "PSUBSCRIBE",
        "SSUBSCRIBE",
        "MONITOR",
        "CLIENT",
        "AUTH",
        "HELLO",
        "RESET",
        "QUIT",
    }
)

_Queued = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]


class AutoPipelineRedis(aioredis.Redis):
    """Shares another client's connection pool: `AutoPipelineRedis(connection_pool=pool)`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queued: list[_Queued] = []
        self._flushes: set[asyncio.Task[None]] = set()

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = args[0]
        if isinstance(name, bytes):
            name = name.decode()
        if self.single_connection_client or str(name).upper().split(" ", 1)[0] in _DIRECT:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((args, options, future))
        return await future

    def _flush(self) -> None:
        batch, self._queued = self._queued, []
        if batch:
            task = asyncio.create_task(self._send(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _send(self, batch: list[_Queued]) -> None:
        pipe = self.pipeline(transaction=False)
        for args, options, _ in batch:
            pipe.execute_command(*args, **options)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as e:
            # The connection failed: every caller hears it.
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        except BaseException:
            for _, _, future in batch:
                future.cancel()
            raise
        for (_, _, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the caller gave up (timeout, cancellation)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
