"""argon2id password hashing, off the event loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher
from argon2.low_level import Type


class Hasher:
    """Hashes on a thread pool: argon2-cffi releases the GIL, so threads use every core."""

    def __init__(self, *, time_cost: int, memory_kib: int, parallelism: int, threads: int):
        self._ph = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2")

    async def hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._ph.hash, password)

    def hash_sync(self, password: str) -> str:
        return self._ph.hash(password)

    def verify(self, hashed: str, password: str) -> bool:
        from argon2.exceptions import VerificationError

        try:
            return self._ph.verify(hashed, password)
        except VerificationError:
            return False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
