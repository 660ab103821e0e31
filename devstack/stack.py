"""The services as processes with settings tuned for failure drills, and a load client.

Used by the fault tests and by `make chaos`: short visibility timeout and reconcile age,
small relay batches, enough retries to outlast a 10-second SMTP outage.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp

from devstack.procs import wait_for_port
from devstack.services import ServiceProcess


def _signup(name: str) -> dict[str, Any]:
    return {
        "username": name,
        "full_name": f"User {name}",
        "email": f"{name}@example.com",
        "password": "correct horse battery",
    }


class Stack:
    """API, relay(s) and worker(s) as processes, and the ways to hurt them."""

    def __init__(self, env: dict[str, str], api_port: int, logs: Path) -> None:
        self.env = {
            **env,
            "API_PORT": str(api_port),
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{api_port}",
            "RELAY_BATCH_SIZE": "50",
            "RELAY_POLL_INTERVAL_SECONDS": "0.5",
            "RELAY_RECONCILE_AFTER_SECONDS": "3",
            "RELAY_MAINTENANCE_INTERVAL_SECONDS": "1",
            "VISIBILITY_TIMEOUT_SECONDS": "3",
            "WORKER_CONCURRENCY": "32",
            "WORKER_MAX_ATTEMPTS": "12",
            "WORKER_RETRY_BACKOFF_BASE_SECONDS": "0.5",
            "WORKER_RETRY_BACKOFF_MAX_SECONDS": "3",
            "WORKER_MAINTENANCE_INTERVAL_SECONDS": "1",
            "SMTP_TIMEOUT_SECONDS": "5",
            "METRICS_PORT": "0",
        }
        self.base = f"http://127.0.0.1:{api_port}"
        self.api_port = api_port
        self.logs = logs
        self.procs: list[ServiceProcess] = []
        self._n = 0

    def start(self, name: str, **env: str) -> ServiceProcess:
        self._n += 1
        args = None
        if "app" in env:
            args = [sys.executable, "-m", "worker_service", "--app", env.pop("app")]
        proc = ServiceProcess(
            name, {**self.env, **env}, self.logs / f"{name}-{self._n}.log", args
        ).start()
        self.procs.append(proc)
        if name == "api":
            wait_for_port(self.api_port, 30, proc.proc)
        return proc

    def stop_all(self) -> dict[str, int]:
        return {p.name: p.terminate() for p in self.procs if p.alive}

    async def signups(self, n: int, prefix: str, concurrency: int = 16) -> int:
        """POST n signups; the number the API answered 201 for (others did not commit)."""
        created = 0
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)

        async def client(http: aiohttp.ClientSession) -> None:
            nonlocal created
            while not queue.empty():
                i = queue.get_nowait()
                try:
                    resp = await http.post(f"{self.base}/v1/users", json=_signup(f"{prefix}{i}"))
                    created += resp.status == 201
                    resp.release()
                except aiohttp.ClientError:
                    pass

        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return created
