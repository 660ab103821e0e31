"""argon2id password hashing, off the event loop."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from argon2 import PasswordHasher
from argon2.low_level import Type


class HashQueueFull(Exception):
    """More hashes are waiting for a thread than the API takes on: answer 503 at once."""


class Hasher:
    """Hashes on a thread pool: argon2-cffi releases the GIL, so threads use every core.

    At most `max_waiting` hashes wait for a thread; beyond that hash() refuses at once. A
    signup costs a full hash whatever its outcome (a taken name is found by the insert
    after it), so without a bound a flood of requests would queue for ever, each holding
    its connection, and delay every real signup behind it.
    """

    def __init__(
        self,
        *,
        time_cost: int,
        memory_kib: int,
        parallelism: int,
        threads: int,
        max_waiting: int,
    ):
        self._ph = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2")
        self._limit = threads + max_waiting
        # Hashes submitted and not finished, counted until their thread is done with them
        # (not until their request goes away): a thread releases its slot.
        self._in_flight = 0
        self._lock = threading.Lock()

    async def hash(self, password: str) -> str:
        with self._lock:
            if self._in_flight >= self._limit:
                raise HashQueueFull
            self._in_flight += 1
        job = self._pool.submit(self._ph.hash, password)
        job.add_done_callback(self._release)
        return await asyncio.wrap_future(job)

    def _release(self, _job: Future[str]) -> None:
        with self._lock:
            self._in_flight -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
