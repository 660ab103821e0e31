"""Failure injection: every failure the design promises to survive, with 500 signups in
flight. After each, every committed user has exactly one usable verification email, and
nothing is left pending. Duplicates may only come from killing a worker between an SMTP
send and its commit; they are counted and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from api_service.app import POOL_CLOSE_SECONDS
from devstack import ledger
from devstack.postgres import PostgresServer
from devstack.procs import free_port, wait_for_port
from devstack.redis import RedisServer
from devstack.services import ServiceProcess
from devstack.smtp_sink import SmtpSink
from devstack.stack import Stack
from shared.connections import close_pool, create_pool
from shared.constants import CONSUMER_GROUP, stream_key
from shared.lifecycle import STOP_FLOOR_SECONDS, Loop, finish_anyway, stop_within
from tests.helpers import eventually, signup_body, worker_settings
from worker_service import __main__ as worker_main

pytestmark = pytest.mark.fault

SIGNUPS = 500
MAX_3 = {"WORKER_MAX_ATTEMPTS": "3"}


@pytest.fixture
async def stack(
    clean: None,
    service_env: dict[str, str],
    ports: dict[str, int],
    workdir: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Stack]:
    s = Stack(service_env, ports["api"], workdir / "fault-logs" / request.node.name)
    try:
        yield s
    finally:
        s.stop_all()


async def settle(
    pg_server: PostgresServer,
    redis_server: RedisServer,
    smtp_sink: SmtpSink,
    timeout: float = 90,
    dead: int = 0,
    given_up: frozenset[str] = frozenset(),
) -> ledger.Ledger:
    """Wait until every outbox row is finished and nothing is pending; the ledger.

    given_up: the users whose task was dead-lettered, so who have no email."""
    conn = await asyncpg.connect(pg_server.dsn)
    r = aioredis.Redis.from_url(redis_server.url)
    try:

        async def finished() -> bool:
            try:
                unfinished = await conn.fetchval(
                    "SELECT count(*) FROM outbox"
                    " WHERE completed_at IS NULL AND dead_lettered_at IS NULL"
                )
                pending = (await r.xpending(stream_key(), CONSUMER_GROUP))["pending"]
            except Exception:
                return False
            return bool(unfinished == 0 and pending == 0)

        try:
            await eventually(finished, timeout=timeout, interval=0.25)
        except AssertionError:
            state = await conn.fetch(
                "SELECT published_at IS NOT NULL AS published, publish_attempts, last_error,"
                " count(*) FROM outbox WHERE completed_at IS NULL AND dead_lettered_at IS NULL"
                " GROUP BY 1, 2, 3"
            )
            pending: object
            try:
                pending = await r.xpending(stream_key(), CONSUMER_GROUP)
            except Exception as e:
                pending = repr(e)
            raise AssertionError(
                f"not settled: unfinished={[dict(x) for x in state]} pending={pending}"
            ) from None
        result = await ledger.compute(conn, smtp_sink.directory)
    finally:
        await conn.close()
        await r.aclose()
    print("\n" + result.table())
    assert set(result.lost_users) == given_up, f"lost: {result.lost_users[:10]}"
    assert result.extra_usable == 0
    assert result.unfinished == 0
    assert result.dead_lettered == dead
    assert result.delivered == result.committed - len(given_up)
    return result


async def wait_emails(smtp_sink: SmtpSink, at_least: int, timeout: float = 60) -> None:
    async def enough() -> bool:
        return len(list(smtp_sink.directory.glob("*.eml"))) >= at_least

    await eventually(enough, timeout=timeout, interval=0.05)


async def test_kill_9_relay_mid_batch(
    stack: Stack, pg_server: PostgresServer, redis_server: RedisServer, smtp_sink: SmtpSink
) -> None:
    stack.start("api")
    stack.start("worker")
    assert await stack.signups(SIGNUPS, "relaykill") == SIGNUPS
    r = aioredis.Redis.from_url(redis_server.url)
    await r.config_resetstat()
    relay = stack.start("relay")

    async def some_published() -> bool:
        return int(await r.xlen(stream_key())) >= 100

    await eventually(some_published, timeout=30, interval=0.005)
    relay.kill()  # mid-drain: batches of 50, some claimed and not committed
    stack.start("relay")
    result = await settle(pg_server, redis_server, smtp_sink)
    assert result.committed == SIGNUPS
    assert result.duplicated == 0
    # Each event went into the stream once: the worker's idempotent handler would hide a
    # second entry from the emails. (That the new relay finds an XADD its killed forerunner
    # made before its commit is test_relay.py's test_crash_between_xadd_and_commit_...:
    # where this kill lands in a batch is up to the moment.)
    stats = await r.info("commandstats")
    await r.aclose()
    assert stats["cmdstat_xadd"]["calls"] == SIGNUPS


async def test_kill_9_worker_mid_handler(
    stack: Stack, pg_server: PostgresServer, redis_server: RedisServer, smtp_sink: SmtpSink
) -> None:
    smtp_sink.handler.delay_seconds = 0.02  # handlers are in flight when the kill comes
    stack.start("api")
    stack.start("relay")
    worker = stack.start("worker")
    sending = asyncio.create_task(stack.signups(SIGNUPS, "workerkill"))
    await wait_emails(smtp_sink, 100)
    worker.kill()
    stack.start("worker")  # a new consumer takes over after the visibility timeout
    assert await sending == SIGNUPS
    result = await settle(pg_server, redis_server, smtp_sink)
    # Only entries whose SMTP send finished just before the kill can be sent twice.
    assert result.duplicated <= 32


async def test_an_entry_that_kills_its_worker_takes_no_other_entry_with_it(
    stack: Stack, pg_server: PostgresServer, redis_server: RedisServer, smtp_sink: SmtpSink
) -> None:
    """One signup's task kills its worker process each time it runs, with other entries in
    flight beside it; the worker is restarted (same consumer name, as a container keeps
    its pid) each time, as an orchestrator would. The entries that were in flight are
    orphans and run alone, so they complete; only the killer gathers deliveries, and past
    WORKER_MAX_ATTEMPTS it is dead-lettered instead of run again."""
    smtp_sink.handler.delay_seconds = 0.2  # entries are in flight beside the killer
    env = {"app": "tests.fault_app:router", "WORKER_CONSUMER_NAME": "restarted", **MAX_3}
    stack.start("api")
    stack.start("relay")
    workers = [stack.start("worker", **env)]

    async def keep_a_worker_running() -> None:
        while True:
            await asyncio.sleep(0.05)
            if not workers[-1].alive:
                workers.append(stack.start("worker", **env))

    supervisor = asyncio.create_task(keep_a_worker_running())
    try:
        sending = asyncio.create_task(stack.signups(SIGNUPS, "ok", concurrency=4))
        await wait_emails(smtp_sink, 20)
        assert await stack.signups(1, "crash") == 1
        assert await sending == SIGNUPS
        result = await settle(
            pg_server, redis_server, smtp_sink, dead=1, given_up=frozenset({"crash0"})
        )
    finally:
        supervisor.cancel()
    assert result.duplicated <= 32  # sent just before a crash, its record cut off
    exits = [w.proc.returncode for w in workers[:-1] if w.proc is not None]
    assert exits == [70, 70, 70]  # its three deliveries; the fourth dead-letters it
    orphans = sum(w.logs().count('"worker_orphan_taken"') for w in workers)
    assert orphans > 3, "no entry was in flight beside the killer: the test proves nothing"


async def test_a_worker_whose_handler_swallows_its_cancellation_still_exits(
    stack: Stack, smtp_sink: SmtpSink, redis: aioredis.Redis
) -> None:
    """A handler that never ends and swallows every cancellation (its timeout's, the
    stop's, asyncio.run()'s at exit) held the process for ever: SIGTERM ended in SIGKILL.
    It now exits, non-zero and saying which task would not end, and its delivery counts
    (handed back uncounted, it would run again as attempt 1 for ever)."""
    stack.start("api")
    stack.start("relay")
    worker = stack.start(
        "worker", app="tests.fault_app:router", SHUTDOWN_GRACE_SECONDS="1", **MAX_3
    )
    assert await stack.signups(1, "deaf") == 1
    assert await stack.signups(1, "fine") == 1
    await wait_emails(smtp_sink, 1)  # the other entry goes through beside it
    await asyncio.sleep(1.5)  # past the handler's 1 s timeout, which it ignores
    t = time.monotonic()
    code = worker.terminate(timeout=30)
    took = time.monotonic() - t
    log = worker.logs()
    assert code == 1, log[-3000:]
    assert took < 10, f"exited after {took:.1f}s"
    assert '"worker_handlers_ignore_cancellation"' in log
    assert '"tasks_ignore_cancellation"' in log
    # Handed back for another worker with its timed-out delivery counted.
    (pending,) = await redis.xpending_range(stream_key("default"), CONSUMER_GROUP, "-", "+", 10)
    assert pending["times_delivered"] == 1
    for p in stack.procs:  # the fixture stops the rest; this one is done
        if p is worker:
            stack.procs.remove(p)


async def test_redis_stopped_for_5_seconds(
    stack: Stack, pg_server: PostgresServer, redis_server: RedisServer, smtp_sink: SmtpSink
) -> None:
    stack.start("api")
    stack.start("relay")
    stack.start("worker")
    sending = asyncio.create_task(stack.signups(SIGNUPS, "redisstop", concurrency=4))
    await wait_emails(smtp_sink, 50)
    redis_server.stop()  # clean stop: the append-only file keeps the data
    await asyncio.sleep(5)
    redis_server.start()
    assert await sending == SIGNUPS  # signups never depend on Redis
    result = await settle(pg_server, redis_server, smtp_sink)
    assert result.duplicated == 0


async def test_redis_restarted_with_its_data_wiped(
    stack: Stack, pg_server: PostgresServer, redis_server: RedisServer, smtp_sink: SmtpSink
) -> None:
    smtp_sink.handler.delay_seconds = 0.01
    stack.start("api")
    stack.start("relay")
    stack.start("worker")
    sending = asyncio.create_task(stack.signups(SIGNUPS, "rediswipe", concurrency=4))
    await wait_emails(smtp_sink, 100)
    redis_server.restart(wipe=True)  # stream, group and dedupe keys gone
    assert await sending == SIGNUPS
    result = await settle(pg_server, redis_server, smtp_sink)
    assert result.duplicated == 0  # the reconciler republishes; the handler is idempotent


async def test_postgres_restarted(
    stack: Stack, pg_server: PostgresServer, redis_server: RedisServer, smtp_sink: SmtpSink
) -> None:
    stack.start("api")
    stack.start("relay")
    stack.start("worker")
    sending = asyncio.create_task(stack.signups(SIGNUPS, "pgrestart", concurrency=4))
    await wait_emails(smtp_sink, 100)
    pg_server.kill()  # a crash, then recovery from the WAL
    await asyncio.sleep(1)
    pg_server.start()
    committed = await sending
    assert committed > 100  # some signups failed while Postgres was down: not committed
    result = await settle(pg_server, redis_server, smtp_sink)
    assert result.committed >= committed
    # A crash of Postgres between an SMTP send and the commit that records it is the same
    # window as a worker kill there: the send is repeated, and only the second link works
    # (the first one's record was rolled back). At most one per handler in flight.
    assert result.duplicated <= 32


async def test_smtp_refusing_for_10_seconds(
    stack: Stack, pg_server: PostgresServer, redis_server: RedisServer, smtp_sink: SmtpSink
) -> None:
    stack.start("api")
    stack.start("relay")
    stack.start("worker")
    sending = asyncio.create_task(stack.signups(SIGNUPS, "smtpdown", concurrency=4))
    await wait_emails(smtp_sink, 50)
    smtp_sink.refuse_connections()
    await asyncio.sleep(10)
    smtp_sink.accept_connections()
    assert await sending == SIGNUPS
    result = await settle(pg_server, redis_server, smtp_sink)
    assert result.duplicated == 0


async def test_a_hanging_handler_times_out_and_blocks_nothing(
    stack: Stack, pg_server: PostgresServer, redis_server: RedisServer, smtp_sink: SmtpSink
) -> None:
    stack.start("api")
    stack.start("relay")
    stack.start("worker", app="tests.fault_app:router")
    assert await stack.signups(SIGNUPS - 20, "ok") == SIGNUPS - 20
    assert await stack.signups(20, "hang") == 20
    result = await settle(pg_server, redis_server, smtp_sink)
    assert result.committed == SIGNUPS
    assert result.duplicated == 0


async def test_poison_entries_among_good_ones(
    stack: Stack, pg_server: PostgresServer, redis_server: RedisServer, smtp_sink: SmtpSink
) -> None:
    stack.start("api")
    stack.start("relay")
    stack.start("worker")
    r = aioredis.Redis.from_url(redis_server.url)
    sending = asyncio.create_task(stack.signups(SIGNUPS, "poison", concurrency=4))
    rng = random.Random(7)
    poison: list[dict[Any, Any]] = [
        {"e": b"\x00\xffnot json"},
        {"e": b'{"v": 1, "id": "not-a-uuid", "type": "x", "payload": {}}'},
        {
            "e": b'{"v": 1, "id": "5b8f2f0e-7d8a-4c39-9a55-2f3c3d6f1a10", "type": "no_such",'
            b' "payload": {}, "created_at": "2026-01-01T00:00:00+00:00"}'
        },
        {"garbage": b"field"},
    ]
    for entry in poison * 5:
        await asyncio.sleep(rng.uniform(0, 0.2))
        await r.xadd(stream_key(), entry)
    assert await sending == SIGNUPS
    await settle(pg_server, redis_server, smtp_sink, dead=0)
    assert await r.xlen("outbox:{default}:dead") == 20
    await r.aclose()


async def test_rolling_restart_loses_and_duplicates_nothing(
    stack: Stack, pg_server: PostgresServer, redis_server: RedisServer, smtp_sink: SmtpSink
) -> None:
    smtp_sink.handler.delay_seconds = 0.01
    stack.start("api")
    relays = [stack.start("relay"), stack.start("relay")]
    workers = [stack.start("worker"), stack.start("worker")]
    sending = asyncio.create_task(stack.signups(SIGNUPS, "rolling", concurrency=4))
    await wait_emails(smtp_sink, 50)
    for group, name in ((workers, "worker"), (relays, "relay")):
        for i in range(len(group)):
            code = await asyncio.to_thread(group[i].terminate)  # SIGTERM, as an orchestrator
            assert code == 0
            group[i] = stack.start(name)
            await asyncio.sleep(0.5)
    assert await sending == SIGNUPS
    result = await settle(pg_server, redis_server, smtp_sink)
    assert result.duplicated == 0


async def test_services_stop_within_one_grace_not_one_each() -> None:
    """Three services that each use all the grace they are given: stopped within one grace
    together, the later ones get what the earlier left (each its own 10 s would add up past
    compose's 15 s stop period, and the process would be SIGKILLed mid-stop)."""
    given: list[float] = []

    class Slow:
        def __init__(self, name: str) -> None:
            self.name = name

        async def start(self) -> None:
            pass

        async def stop(self, grace: float = 10.0) -> None:
            given.append(grace)
            await asyncio.sleep(min(grace, 0.3))

    await stop_within([Slow("a"), Slow("b"), Slow("c")], 1.0)
    assert given[0] == pytest.approx(1.0, abs=0.05)
    assert 0.5 <= given[1] <= 0.75  # what a's 0.3 s left of 1.0
    assert given[2] == STOP_FLOOR_SECONDS  # nothing left: just time to close


class _HidesItsCancellation(Loop):
    name = "hides-cancellation"

    def __init__(self, returns: bool) -> None:
        super().__init__()
        self.returns = returns

    async def run_once(self) -> bool:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if not self.returns:  # as redis-py can, in the middle of a command
                raise ConnectionError("Connection closed by server") from None
        return False  # as when redis-py's retry runs the interrupted command again


class _SlowToUnwind(Loop):
    """An iteration that hangs, and whose cleanup hangs too once cancelled: a claim
    transaction whose backend went silent, and its ROLLBACK (asyncpg waits up to its 30 s
    command timeout)."""

    name = "slow-to-unwind"

    async def run_once(self) -> bool:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(30)
            raise
        return False


async def test_a_loop_stop_does_not_wait_out_a_cleanup_that_hangs() -> None:
    """Seen as the relay stopping 33 s after SIGTERM, its grace 2 s, with Postgres
    silent: the stop waited for the cancelled claim's ROLLBACK."""
    loop = _SlowToUnwind()
    await loop.start()
    await asyncio.sleep(0.05)
    t = time.monotonic()
    await loop.stop(grace=0.2)
    took = time.monotonic() - t
    assert took < 0.2 + STOP_FLOOR_SECONDS + 0.5, f"stop took {took:.1f} s"


@pytest.mark.expect_loop_failures
@pytest.mark.parametrize("returns", [False, True])
async def test_a_loop_whose_cancellation_a_library_hides_still_ends(returns: bool) -> None:
    """Cancelled without stop() (asyncio.run() cancels what is left at exit), a background
    loop ends even when its iteration raised another error in place of the cancellation,
    or returned."""
    loop = _HidesItsCancellation(returns)
    await loop.start()
    await asyncio.sleep(0.05)
    assert loop._task is not None
    task = loop._task
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done, "the loop went on after its cancellation"
    await loop.stop()


class _AlwaysFails(Loop):
    name = "always-fails"
    error_backoff_base = 1.0
    error_backoff_cap = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    async def run_once(self) -> bool:
        self.attempts += 1
        raise ConnectionError("Redis is down")


@pytest.mark.expect_loop_failures
async def test_a_failing_loop_backs_off_whatever_wakes_it_but_stops_at_once() -> None:
    """While Redis is down every signup still NOTIFYs the relay: a wake-up must not cut
    the backoff short (each attempt locks a batch of rows and logs a traceback), and a
    loop backing off is not idle, the loop the relay hands a NOTIFY to. stop() still ends
    the backoff."""
    loop = _AlwaysFails()
    await loop.start()
    await asyncio.sleep(0.05)
    assert loop.attempts == 1
    assert not loop.idle  # backing off: not a loop to hand a NOTIFY to
    for _ in range(40):  # 0.4 s of signups, under the least backoff (0.5 s)
        loop.wake()
        await asyncio.sleep(0.01)
    assert loop.attempts == 1
    t = time.monotonic()
    await loop.stop(grace=5)
    assert time.monotonic() - t < 0.2


async def test_a_write_that_fails_after_its_caller_was_cancelled_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stop cancels a worker step in the middle of a write (an ack, a dead-lettering):
    the write goes on, and if Redis then refuses it, the log says so under a name (with
    a bare asyncio.shield only asyncio's "exception was never retrieved", at best)."""
    release = asyncio.Event()

    async def write() -> None:
        await release.wait()
        raise ConnectionError("Redis went away")

    caller = asyncio.create_task(finish_anyway(write(), "write_failed_after_cancel"))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    release.set()
    await asyncio.sleep(0.01)
    (logged,) = [r for r in caplog.records if r.getMessage() == "write_failed_after_cancel"]
    assert logged.levelno == logging.ERROR
    assert logged.exc_info is not None and "Redis went away" in str(logged.exc_info[1])


async def test_a_session_frozen_inside_a_transaction_is_ended_and_its_rows_freed(
    pg_server: PostgresServer, clean: None
) -> None:
    """A relay frozen (SIGSTOP, a VM paused) or cut off right after its claim: Postgres
    ends its session once it has been idle in the transaction for the pool's limit (60 s
    by default, 0.5 s here), so the other relays get its rows, instead of after TCP gives
    up (hours) or never."""
    frozen = await create_pool(pg_server.dsn, max_size=1, idle_in_transaction_seconds=0.5)
    other = await create_pool(pg_server.dsn, max_size=1)
    try:
        async with frozen.acquire() as conn, other.acquire() as conn2:
            await conn.execute(
                "INSERT INTO outbox (event_id, queue, task_type, payload)"
                " VALUES (gen_random_uuid(), 'default', 't', '{}')"
            )
            claim = "SELECT id FROM outbox FOR UPDATE SKIP LOCKED"
            tx = conn.transaction()
            await tx.start()
            assert len(await conn.fetch(claim)) == 1  # claimed; and then nothing more
            assert await conn2.fetch(claim) == []  # locked
            await asyncio.sleep(1.5)
            assert len(await conn2.fetch(claim)) == 1  # the frozen session was ended
            # Its session is gone (asyncpg saw it end, and let the connection go).
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
                await conn.fetch(claim)
    finally:
        frozen.terminate()
        await other.close()


async def test_the_services_pools_end_sessions_left_idle_in_a_transaction(
    pg_server: PostgresServer, redis_server: RedisServer, clean: None
) -> None:
    """What the services' pools get: 60 s by default (the API's and the relay's, and the
    worker's own writes), 10 minutes for the worker's handlers, whose email holds its
    transaction through the SMTP conversation."""
    show = "SHOW idle_in_transaction_session_timeout"
    default = await create_pool(pg_server.dsn, max_size=1)
    handlers, bookkeeping = await worker_main.open_pools(worker_settings(pg_server, redis_server))
    try:
        assert await default.fetchval(show) == "1min"
        assert await bookkeeping.fetchval(show) == "1min"
        assert await handlers.fetchval(show) == "10min"
    finally:
        for pool in (default, handlers, bookkeeping):
            await pool.close()


async def test_a_pool_whose_server_went_silent_closes_within_the_time_given(
    pg_server: PostgresServer,
) -> None:
    """At shutdown with Postgres silent (a partition, a failover in progress), asyncpg's
    close waits for each connection up to its command timeout (30 s), past the stop grace,
    then raises: the orchestrator SIGKILLs the service. close_pool gives up in time."""
    pool = await create_pool(pg_server.dsn, max_size=2)
    async with pool.acquire() as a, pool.acquire() as b:
        backends = [a.get_server_pid(), b.get_server_pid()]
    for pid in backends:
        os.kill(pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        await close_pool(pool, 0.5)
        assert time.monotonic() - t < 2
    finally:
        for pid in backends:
            os.kill(pid, signal.SIGCONT)


async def test_the_api_stops_within_its_grace_with_a_signup_stuck_on_a_silent_postgres(
    clean: None, service_env: dict[str, str], workdir: Path
) -> None:
    """SIGTERM while a signup waits on a Postgres backend that is stopped: the API gives
    the request its grace, then cancels it and drops the pool, and exits 0 within its grace
    and 2 s. aiohttp waits its shutdown timeout twice (for the handler, then again after
    cancelling the request), so the API gives it half the grace (found by review)."""
    port = free_port()
    env = {
        **service_env,
        "API_PORT": str(port),
        "DB_POOL_SIZE": "1",
        "SHUTDOWN_GRACE_SECONDS": "3",
    }
    proc = ServiceProcess("api", env, workdir / "silent-pg-api.log").start()
    assert proc.proc is not None
    wait_for_port(port, 30, proc.proc)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/readyz") as ready:  # its one connection is open
            assert ready.status == 200
        probe = await asyncpg.connect(service_env["DATABASE_URL"])
        try:
            (backend,) = [
                r["pid"]
                for r in await probe.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
                    " AND datname = current_database() AND pid <> pg_backend_pid()"
                )
            ]
            os.kill(backend, signal.SIGSTOP)
            try:
                signup = asyncio.create_task(
                    http.post(f"{url}/v1/users", json=signup_body("stuck"))
                )
                await asyncio.sleep(0.5)  # it waits on the stopped backend
                assert not signup.done()
                t = time.monotonic()
                code = await asyncio.to_thread(proc.terminate, 60)
                took = time.monotonic() - t
                with contextlib.suppress(aiohttp.ClientError):
                    (await signup).release()
            finally:
                os.kill(backend, signal.SIGCONT)
        finally:
            await probe.close()
    assert code == 0, proc.logs()[-2000:]
    # Without halving: 3 s, 3 s more, then the pool's 2 s (8 s). Not before the grace: the
    # request had it.
    assert 3 <= took < 3 + POOL_CLOSE_SECONDS + 1.5, f"stopped after {took:.1f}s"


@pytest.mark.parametrize("service", ["relay", "worker"])
async def test_a_service_stops_within_its_grace_when_postgres_went_silent(
    service: str, clean: None, service_env: dict[str, str], workdir: Path
) -> None:
    """SIGTERM while every Postgres backend the service holds is stopped: it exits 0
    within its grace plus a little, instead of 30 s later with a TimeoutError."""
    port = free_port()
    env = {**service_env, "METRICS_PORT": str(port), "SHUTDOWN_GRACE_SECONDS": "2"}
    proc = ServiceProcess(service, env, workdir / f"silent-pg-{service}.log").start()
    assert proc.proc is not None
    wait_for_port(port, 30, proc.proc)
    await asyncio.sleep(1.0)  # its loops have run and hold their connections
    probe = await asyncpg.connect(service_env["DATABASE_URL"])
    try:
        backends = [
            r["pid"]
            for r in await probe.fetch(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
                " AND datname = current_database() AND pid <> pg_backend_pid()"
            )
        ]
        assert backends
        for pid in backends:
            os.kill(pid, signal.SIGSTOP)
        try:
            t = time.monotonic()
            code = proc.terminate(timeout=60)
            took = time.monotonic() - t
        finally:
            for pid in backends:
                os.kill(pid, signal.SIGCONT)
    finally:
        await probe.close()
    assert code == 0, proc.logs()[-2000:]
    assert took < 2 + 3, f"stopped after {took:.1f}s"
