"""`make chaos`: signups under load while components are killed and restarted at random.

    python -m devstack.chaos --duration 60 --rate 40 --seed 1

Starts its own Postgres, Redis and SMTP sink in a temporary folder, an API, two relays and
two workers; sends signups at a fixed rate; every few seconds does one harmful thing
(kill -9 a relay, a worker or the API, a rolling SIGTERM restart, stop Redis, wipe Redis,
crash Postgres, make SMTP refuse connections); then lets everything recover and prints the
ledger: signups committed, emails delivered, lost, duplicated, dead-lettered, worst delay.
Exits 1 if anything was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from devstack import ledger
from devstack.postgres import PostgresServer
from devstack.procs import free_port, make_traversable
from devstack.redis import RedisServer
from devstack.services import ServiceProcess
from devstack.smtp_sink import SmtpSink
from devstack.stack import Stack, _signup
from shared.migrate import migrate


class Chaos:
    def __init__(self, workdir: Path, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pg = PostgresServer(workdir / "pg" / "data", durable=False, log=workdir / "pg.log")
        self.redis = RedisServer(workdir / "redis", log=workdir / "redis.log")
        self.sink = SmtpSink(workdir / "mail")
        self.workdir = workdir
        self.actions: list[tuple[float, str]] = []
        self.started = time.monotonic()
        self.stack: Stack | None = None
        self.relays: list[ServiceProcess] = []
        self.workers: list[ServiceProcess] = []
        self.api: ServiceProcess | None = None

    def log(self, what: str) -> None:
        t = time.monotonic() - self.started
        self.actions.append((round(t, 2), what))
        print(f"  [{t:6.1f}s] {what}", file=sys.stderr, flush=True)

    async def setup(self) -> Stack:
        self.pg.start()
        self.redis.start()
        self.sink.start()
        await migrate(self.pg.dsn)
        env = {
            "DATABASE_URL": self.pg.dsn,
            "REDIS_URL": self.redis.url,
            "SMTP_URL": self.sink.url,
            "ARGON2_TIME_COST": "1",
            "ARGON2_MEMORY_KIB": "1024",
            "LOG_LEVEL": "WARNING",
            "API_HOST": "127.0.0.1",
            "METRICS_HOST": "127.0.0.1",
            "SHUTDOWN_GRACE_SECONDS": "5",
        }
        self.stack = Stack(env, free_port(), self.workdir / "logs")
        self.api = self.stack.start("api")
        self.relays = [self.stack.start("relay") for _ in range(2)]
        self.workers = [self.stack.start("worker") for _ in range(2)]
        return self.stack

    async def harm(self) -> None:
        """One harmful action, and its repair."""
        assert self.stack is not None
        action = self.rng.choice(
            [
                "kill_relay",
                "kill_worker",
                "kill_api",
                "rolling_worker",
                "rolling_relay",
                "stop_redis",
                "wipe_redis",
                "crash_postgres",
                "smtp_down",
            ]
        )
        if action in ("kill_relay", "rolling_relay"):
            i = self.rng.randrange(len(self.relays))
            self.log(f"{'kill -9' if action == 'kill_relay' else 'SIGTERM'} relay {i}")
            await self._replace(self.relays, i, "relay", hard=action == "kill_relay")
        elif action in ("kill_worker", "rolling_worker"):
            i = self.rng.randrange(len(self.workers))
            self.log(f"{'kill -9' if action == 'kill_worker' else 'SIGTERM'} worker {i}")
            await self._replace(self.workers, i, "worker", hard=action == "kill_worker")
        elif action == "kill_api":
            self.log("kill -9 api")
            assert self.api is not None
            self.api.kill()
            await asyncio.sleep(0.3)
            self.api = await asyncio.to_thread(self.stack.start, "api")
        elif action == "stop_redis":
            self.log("stop Redis for 3 s")
            self.redis.stop()
            await asyncio.sleep(3)
            self.redis.start()
        elif action == "wipe_redis":
            self.log("restart Redis with its data wiped")
            self.redis.restart(wipe=True)
        elif action == "crash_postgres":
            self.log("kill -9 Postgres, restart after 1 s")
            self.pg.kill()
            await asyncio.sleep(1)
            await asyncio.to_thread(self.pg.start)
        else:
            self.log("SMTP refuses connections for 5 s")
            self.sink.refuse_connections()
            await asyncio.sleep(5)
            self.sink.accept_connections()

    async def _replace(self, group: list[ServiceProcess], i: int, name: str, hard: bool) -> None:
        assert self.stack is not None
        if hard:
            group[i].kill()
        else:
            await asyncio.to_thread(group[i].terminate)
        group[i] = self.stack.start(name)

    def teardown(self) -> None:
        """Every step, whatever the one before did: a step that raised (a drill stopped in
        the middle of an action) would otherwise leave Postgres and Redis running."""
        steps: list[Callable[[], object]] = [self.sink.stop, self.redis.kill, self.pg.stop]
        if self.stack is not None:
            steps.insert(0, self.stack.stop_all)
        for step in steps:
            try:
                step()
            except Exception as e:  # reported; the next step runs
                print(f"chaos: teardown: {step.__qualname__} failed: {e!r}", file=sys.stderr)


async def load(
    stack: Stack, rate: float, until: float, counts: dict[str, int], created: set[str]
) -> None:
    """Open loop: one signup every 1/rate seconds, whatever the answers take. `created`
    gets the usernames answered 201."""
    sem = asyncio.Semaphore(64)
    tasks: set[asyncio.Task[None]] = set()

    async def one(http: aiohttp.ClientSession, n: int) -> None:
        async with sem:
            try:
                resp = await http.post(f"{stack.base}/v1/users", json=_signup(f"chaos{n}"))
                counts["201" if resp.status == 201 else "failed"] += 1
                if resp.status == 201:
                    created.add(f"chaos{n}")
                resp.release()
            except (aiohttp.ClientError, TimeoutError):
                counts["failed"] += 1

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        n = 0
        next_at = time.monotonic()
        while time.monotonic() < until:
            n += 1
            t = asyncio.create_task(one(http, n))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*tasks)


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="outbox-chaos-"))
    make_traversable(workdir)
    chaos = Chaos(workdir, args.seed)
    try:
        stack = await chaos.setup()
        print(
            f"chaos: {args.duration}s at {args.rate} signups/s, seed {args.seed}",
            file=sys.stderr,
            flush=True,
        )
        until = time.monotonic() + args.duration
        counts = {"201": 0, "failed": 0}
        created: set[str] = set()
        loader = asyncio.create_task(load(stack, args.rate, until, counts, created))
        await asyncio.sleep(2)
        while time.monotonic() < until - 3:
            await chaos.harm()
            await asyncio.sleep(chaos.rng.uniform(1.5, 4))
        await loader
        print("chaos: load over; waiting for the pipeline to settle", file=sys.stderr, flush=True)
        conn = await asyncpg.connect(chaos.pg.dsn)
        try:
            deadline = time.monotonic() + args.settle
            while time.monotonic() < deadline:
                left = await conn.fetchval(
                    "SELECT count(*) FROM outbox WHERE completed_at IS NULL"
                    " AND dead_lettered_at IS NULL"
                )
                if left == 0:
                    break
                await asyncio.sleep(0.5)
            result = await ledger.compute(conn, chaos.sink.directory)
            # A 201 promises a committed signup: every one must be in the database.
            committed = {
                r["username"]
                for r in await conn.fetch(
                    "SELECT username FROM users WHERE username = ANY($1::text[])", list(created)
                )
            }
            vanished = sorted(created - committed)
        finally:
            await conn.close()
        report: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "duration_s": args.duration,
            "rate": args.rate,
            "seed": args.seed,
            "http_201": counts["201"],
            "http_failed": counts["failed"],
            "answered_201_not_committed": vanished,
            "actions": chaos.actions,
            "ledger": result.as_dict(),
        }
        print("\nactions:")
        for t, what in chaos.actions:
            print(f"  {t:7.1f}s  {what}")
        print(
            f"\nHTTP: {counts['201']} created, {counts['failed']} failed (not committed or "
            "answer lost)\n"
        )
        print(result.table())
        if vanished:
            print(f"\nanswered 201 but not committed: {len(vanished)} ({', '.join(vanished[:10])})")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, default=str))
        ok = (
            result.lost == 0
            and result.extra_usable == 0
            and result.unfinished == 0
            and not vanished
        )
        print("\nchaos: " + ("OK, nothing lost" if ok else "FAILED: see the ledger"))
        return 0 if ok else 1
    finally:
        chaos.teardown()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (60)")
    parser.add_argument("--rate", type=float, default=40, help="signups per second (40)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--settle", type=float, default=120, help="max seconds to recover")
    parser.add_argument("--out", type=Path, default=Path(".data/chaos/ledger.json"))
    parser.add_argument("--keep", action="store_true", help="keep the servers' data and logs")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
