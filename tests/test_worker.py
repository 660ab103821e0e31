"""The worker's delivery mechanics against real Redis and Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError

from devstack.postgres import PostgresServer
from devstack.procs import free_port
from devstack.redis import RedisServer
from relay.publisher import RelayLoop
from shared.connections import create_pool, create_redis
from shared.constants import (
    CONSUMER_GROUP,
    RETRY_PARKING_CONSUMER,
    alone_key,
    dead_letter_key,
    dedupe_key,
    stream_key,
)
from shared.errors import PermanentError
from shared.http_probe import REFRESH_TIMEOUT_SECONDS, ProbeServer
from shared.lifecycle import spend_cancellation
from shared.outbox import enqueue
from tests.helpers import eventually, relay_settings, worker_settings
from worker_service import consumer as consumer_mod
from worker_service.consumer import Worker
from worker_service.maintenance import refresh_gauges, remove_gone_consumers
from worker_service.queue import REPLAY_DEDUPE_TTL_SECONDS, Entry, PendingInfo, StreamQueue
from worker_service.router import Router, TaskContext

STREAM = stream_key()
DEAD = dead_letter_key()


class Recorder:
    """A router whose handlers record calls and fail on demand."""

    def __init__(self) -> None:
        self.router = Router()
        self.calls: list[tuple[str, int]] = []
        self.fail_times: dict[str, int] = {}
        self.sleep = 0.0
        self.sleep_for: dict[str, float] = {}  # per entry ("i"), instead of `sleep`
        self.running = 0
        self.max_running = 0
        self._now_running: set[str] = set()
        # Per entry, the most handlers that ran at once while it ran (1: it ran alone).
        self.company: dict[str, int] = {}

        @self.router.handler("t")
        async def handle(ctx: TaskContext) -> None:
            key = str(ctx.payload["i"])
            self.calls.append((key, ctx.attempt))
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self._now_running.add(key)
            for other in self._now_running:
                self.company[other] = max(self.company.get(other, 0), len(self._now_running))
            try:
                delay = self.sleep_for.get(key, self.sleep)
                if delay:
                    await asyncio.sleep(delay)
                if self.fail_times.get(key, 0) > 0:
                    self.fail_times[key] -= 1
                    raise RuntimeError(f"boom {key}")
            finally:
                self.running -= 1
                self._now_running.discard(key)

        self.released = False  # ends the "stubborn" handler

        @self.router.handler("stubborn", timeout=0.2)
        async def stubborn(ctx: TaskContext) -> None:
            while not self.released:  # swallows its timeout's cancellation until released
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.05)

        @self.router.handler("permanent")
        async def permanent(ctx: TaskContext) -> None:
            raise PermanentError("cannot ever work")

        @self.router.handler("garbled")
        async def garbled(ctx: TaskContext) -> None:
            # A 5xx reply that was not UTF-8, as aiosmtplib decodes it (surrogateescape).
            raise PermanentError(b"550 Bo\xeete pleine\x00".decode("utf-8", "surrogateescape"))

        @self.router.handler("slow", timeout=0.2)
        async def slow(ctx: TaskContext) -> None:
            await asyncio.sleep(5)

        @self.router.handler("masks_cancel", timeout=0.2)
        async def masks_cancel(ctx: TaskContext) -> None:
            # As redis-py may do: a cancellation in the middle of a call comes out as
            # another error.
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                raise ConnectionError("connection closed by cancellation") from None

        @self.router.handler("slow_cleanup", timeout=0.2)
        async def slow_cleanup(ctx: TaskContext) -> None:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                await asyncio.sleep(1)  # cleanup that outlives the deadline
                raise

        @self.router.handler("returns_on_cancel", timeout=0.2)
        async def returns_on_cancel(ctx: TaskContext) -> None:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                return  # stops half way, and says nothing

        @self.router.handler("spent_before", timeout=0.2)
        async def spent_before(ctx: TaskContext) -> None:
            spend_cancellation()  # as after an asyncio.timeout() of its own, earlier
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                return  # the worker's timeout: stops half way, and says nothing

        @self.router.handler("done_on_cancel", timeout=0.2)
        async def done_on_cancel(ctx: TaskContext) -> None:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                spend_cancellation()  # its work is done (as an email sent and recorded)

        @self.router.handler("own_timeout", timeout=5)
        async def own_timeout(ctx: TaskContext) -> None:
            raise TimeoutError("SMTP server did not answer")

        @self.router.handler("quick", timeout=0.2)
        async def quick(ctx: TaskContext) -> None:
            await asyncio.sleep(0.01)
            self.calls.append(("quick", ctx.attempt))


class StalledCompletions:
    """A pool whose completion UPDATE waits for `release` (Postgres hanging on it), or
    fails at once with refuse=True (Postgres down); every other call goes through."""

    def __init__(self, pool: asyncpg.Pool[Any], *, refuse: bool = False) -> None:
        self.pool = pool
        self.refuse = refuse
        self.release = asyncio.Event()

    async def execute(self, query: str, *args: Any) -> Any:
        if "completed_at = now()" in query:
            if self.refuse:
                raise ConnectionError("Postgres is down")
            await self.release.wait()
        return await self.pool.execute(query, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


async def delivered_to(redis: aioredis.Redis, consumer: str, n: int) -> list[Entry]:
    """The stream's next n entries, delivered to `consumer` (a worker that then died or
    restarted); the group made first if missing."""
    q = StreamQueue(redis, "default")
    await q.ensure_group()
    return await q.read(consumer, n, None)


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


MakeWorker = Callable[..., Worker]


@contextlib.asynccontextmanager
async def running(worker: Worker, rec: Recorder | None = None) -> AsyncIterator[Worker]:
    """The worker started for the block and stopped after it, whatever happens in it; with
    `rec`, its "stubborn" handlers are let go first (they would hold the stop up)."""
    await worker.start()
    try:
        yield worker
    finally:
        if rec is not None:
            rec.released = True
        await worker.stop()


@pytest.fixture
def make_worker(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    rec: Recorder,
    pg_server: PostgresServer,
    redis_server: RedisServer,
) -> MakeWorker:
    """Builds a worker on the recorder's router; keyword arguments override the settings."""

    def _make(**settings: Any) -> Worker:
        return Worker(rec.router, pool, redis, worker_settings(pg_server, redis_server, **settings))

    return _make


@pytest.fixture
async def publish(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    pg_server: PostgresServer,
    redis_server: RedisServer,
) -> Any:
    relay = RelayLoop(pool, redis, relay_settings(pg_server, redis_server))

    async def _publish(n: int, task: str = "t", start: int = 0) -> list[str]:
        async with pool.acquire() as conn, conn.transaction():
            ids = [str(await enqueue(conn, task, {"i": start + i})) for i in range(n)]
        while await relay.run_once():
            pass
        return ids

    return _publish


async def pending_count(redis: aioredis.Redis) -> int:
    client: Any = redis
    summary = await client.xpending(STREAM, CONSUMER_GROUP)
    return int(summary["pending"])


async def dead_letters(redis: aioredis.Redis) -> list[dict[str, str]]:
    client: Any = redis
    return [
        {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
        for _, fields in await client.xrange(DEAD)
    ]


async def test_the_oldest_pending_age_is_time_since_delivery_not_counting_parked_retries(
    redis: aioredis.Redis,
) -> None:
    """The gauge behind the PendingEntriesTooOld alert: an entry added long ago but
    delivered just now is not old (a backlog caught up after an outage), one parked to
    wait out its retry backoff is waiting as it should (SMTP retries last up to an hour),
    and one delivered to a consumer that stopped renewing it is as old as that delivery."""
    client: Any = redis
    queue = StreamQueue(redis, "default")
    await queue.ensure_group()
    ten_minutes_ago = int((time.time() - 600) * 1000)
    old_ids = [
        (await client.xadd(STREAM, {"e": b"x"}, id=f"{ten_minutes_ago}-{i}")).decode()
        for i in range(3)
    ]
    await client.xreadgroup(CONSUMER_GROUP, "live", {STREAM: ">"}, count=3)
    stats = await queue.stats()
    assert stats["pending"] == 3
    assert stats["oldest_pending_age"] < 5  # delivered just now
    await queue.park_for_retry("live", old_ids[:2])
    await asyncio.sleep(1.1)
    await client.xclaim(STREAM, CONSUMER_GROUP, "live", 0, [old_ids[0]], justid=True)  # renewed
    stats = await queue.stats()
    assert 1.0 <= stats["oldest_pending_age"] < 5  # the one left with "live", not the parked
    await client.xack(STREAM, CONSUMER_GROUP, old_ids[2])
    await client.xclaim(STREAM, CONSUMER_GROUP, "live", 0, [old_ids[0]], justid=True)
    assert (await queue.stats())["oldest_pending_age"] < 1  # only the parked one is left


async def test_done_records_completion_then_acks(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
    make_worker: MakeWorker,
) -> None:
    await publish(20)
    worker = make_worker()
    await worker.setup()
    assert await worker.run_once() == 20
    assert sorted(int(i) for i, _ in rec.calls) == list(range(20))
    assert all(attempt == 1 for _, attempt in rec.calls)
    assert await pending_count(redis) == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE completed_at IS NULL") == 0
    # Completions Postgres does not take are not acknowledged: the entries stay pending,
    # to be taken over and found done, instead of gone with their completion unrecorded.
    await publish(3, start=20)
    worker.bookkeeping = StalledCompletions(pool, refuse=True)  # type: ignore[assignment]
    with contextlib.suppress(ConnectionError):
        await worker.run_once()
    assert len(rec.calls) == 23
    assert await pending_count(redis) == 3
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE completed_at IS NULL") == 3


async def test_runs_entries_concurrently_up_to_the_limit(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    await publish(30)
    rec.sleep = 0.1
    worker = make_worker(concurrency=8)
    async with running(worker):
        await eventually(lambda: _is(len(rec.calls) == 30 and rec.running == 0))
        await eventually(lambda: _pending_is(redis, 0))
    assert rec.max_running == 8


async def _is(value: bool) -> bool:
    return value


async def _outcome_logged(caplog: pytest.LogCaptureFixture) -> bool:
    """A worker has recorded a dead letter, or left the outcome to the entry's new holder."""
    ends = {"task_outcome_left_to_new_holder", "task_dead_lettered"}
    return any(r.msg in ends for r in caplog.records)


async def _dead_lettered_at(pool: asyncpg.Pool[Any], event_id: str) -> Any:
    """The event's outbox row's dead_lettered_at (the row must exist)."""
    row = await pool.fetchrow("SELECT dead_lettered_at FROM outbox WHERE event_id = $1", event_id)
    assert row is not None
    return row["dead_lettered_at"]


async def _pending_is(redis: aioredis.Redis, n: int) -> bool:
    return await pending_count(redis) == n


async def test_failed_entry_is_retried_after_backoff_then_done(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    await publish(3)
    rec.fail_times = {"1": 2}
    worker = make_worker()
    async with running(worker):
        await eventually(lambda: _is(("1", 3) in rec.calls))
        await eventually(lambda: _pending_is(redis, 0))
    attempts = [a for i, a in rec.calls if i == "1"]
    assert attempts == [1, 2, 3]  # the delivery counter is the attempt number
    assert Counter(i for i, _ in rec.calls) == {"0": 1, "1": 3, "2": 1}
    assert await dead_letters(redis) == []


async def test_backoff_is_respected(publish: Any, rec: Recorder, make_worker: MakeWorker) -> None:
    await publish(1)
    rec.fail_times = {"0": 1}
    worker = make_worker(retry_backoff_base_seconds=1.0, retry_backoff_max_seconds=1.0)
    await worker.setup()
    started = time.monotonic()
    await worker.run_once()
    assert rec.calls == [("0", 1)]
    while len(rec.calls) < 2:
        await worker.run_once(block_ms=20)
    # Jitter keeps the delay in [base/2, base].
    assert time.monotonic() - started >= 0.5
    assert rec.calls[1] == ("0", 2)


async def parked_due(redis: aioredis.Redis, publish: Any) -> tuple[StreamQueue, Entry]:
    """One entry whose first attempt failed, parked, and its backoff (0.2 s at most with
    the tests' settings) over: due for its second attempt."""
    await publish(1)
    queue = StreamQueue(redis, "default")
    await queue.ensure_group()
    (entry,) = await queue.read("gone", 1, None)
    assert await queue.park_for_retry("gone", [entry.id]) == 1
    await asyncio.sleep(0.3)
    return queue, entry


async def test_a_parked_retry_another_worker_just_took_is_not_taken_again(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """A worker that saw a parked retry due, and whose XCLAIM comes late (a busy loop, a
    slow reply), must not take it from the worker that claimed and started it meanwhile:
    that one renews its claim only every third of the visibility timeout, so the entry's
    idle time is soon past a short backoff again, and a claim that checks only the idle
    time would run it twice at once (found by review)."""
    _queue, entry = await parked_due(redis, publish)
    rec.sleep = 1.0
    w1, w2 = make_worker(consumer_name="w1"), make_worker(consumer_name="w2")
    claim = w1.queue.claim

    async def late_claim(consumer: str, claims: list[tuple[PendingInfo, int]]) -> list[Entry]:
        await w2._take(await w2.reclaim_once())  # w2 takes the entry and starts it
        assert entry.id in w2._inflight
        await asyncio.sleep(0.3)  # w1 is held up past the backoff
        return await claim(consumer, claims)

    w1.queue.claim = late_claim  # type: ignore[method-assign]
    assert await w1.reclaim_once() == []
    await asyncio.gather(*w2._inflight.values())
    assert rec.calls == [("0", 2)]  # once, as its second attempt
    assert rec.max_running == 1


async def test_a_parked_retry_run_and_parked_again_meanwhile_waits_its_new_backoff(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """The same late claim, when the other worker has meanwhile run the retry, seen it
    fail and parked it again: its owner is the parking one again, but its delivery count
    moved on, and so did its backoff; the late claim must not run its next attempt early
    (found by review)."""
    queue, _entry = await parked_due(redis, publish)
    rec.fail_times = {"0": 1}  # its second attempt fails at once
    w1, w2 = make_worker(consumer_name="w1"), make_worker(consumer_name="w2")
    claim = w1.queue.claim

    async def parked_again() -> bool:
        (p,) = await queue.pending(min_idle_ms=0, count=1)
        return p.consumer == RETRY_PARKING_CONSUMER and p.deliveries == 2

    async def late_claim(consumer: str, claims: list[tuple[PendingInfo, int]]) -> list[Entry]:
        await w2._take(await w2.reclaim_once())
        await asyncio.gather(*w2._inflight.values())
        await eventually(parked_again)
        # Past the first backoff (at most 50 ms here), not always past the second.
        await asyncio.sleep(0.06)
        return await claim(consumer, claims)

    w1.queue.claim = late_claim  # type: ignore[method-assign]
    assert await w1.reclaim_once() == []
    assert rec.calls == [("0", 2)]
    assert await parked_again()


async def test_last_attempt_goes_to_dead_letters_with_the_reason(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
    make_worker: MakeWorker,
) -> None:
    (event_id,) = await publish(1)
    rec.fail_times = {"0": 99}
    worker = make_worker()
    async with running(worker):
        await eventually(lambda: _dead_count_is(redis, 1))
    (dead,) = await dead_letters(redis)
    assert dead["reason"] == "max_attempts"
    assert dead["attempts"] == "3"
    assert dead["event_id"] == event_id
    assert dead["task_type"] == "t"
    assert "RuntimeError: boom 0" in dead["error"]
    assert dead["original_id"]
    assert dead["failed_at"] and dead["enqueued_at"]
    assert orjson.loads(dead["e"])["id"] == event_id
    assert len(rec.calls) == 3
    assert await pending_count(redis) == 0  # XACKed with the XADD
    row = await pool.fetchrow("SELECT dead_lettered_at, last_error, completed_at FROM outbox")
    assert row is not None
    assert row["dead_lettered_at"] is not None
    assert row["completed_at"] is None
    assert "boom" in row["last_error"]


async def _dead_count_is(redis: aioredis.Redis, n: int) -> bool:
    return int(await redis.xlen(DEAD)) == n


async def test_permanent_error_unknown_type_and_garbage_dead_letter_at_once(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    await publish(5, start=0)
    await publish(1, task="permanent")
    await publish(1, task="no_such_task")
    client: Any = redis
    await client.xadd(STREAM, {"e": b"\xff\xfenot json"})
    await client.xadd(STREAM, {"other": "field"})
    await client.xadd(STREAM, {"e": orjson.dumps({"v": 99, "id": "x"})})
    await publish(5, start=5)
    worker = make_worker()
    await worker.setup()
    await worker.run_once()
    # The good ones around the poison all ran, once each.
    assert sorted(int(i) for i, _ in rec.calls) == list(range(10))
    reasons = Counter(d["reason"] for d in await dead_letters(redis))
    assert reasons == {"permanent_error": 1, "unknown_type": 1, "undecodable": 3}
    assert all(d["attempts"] == "1" for d in await dead_letters(redis))
    assert await pending_count(redis) == 0


async def test_an_undecodable_entry_with_a_readable_id_marks_its_event_dead_lettered(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, publish: Any, make_worker: MakeWorker
) -> None:
    """An envelope broken past its id (a payload that is not an object): the outbox row is
    marked dead-lettered, or the reconciler would find the event unfinished and publish it
    again, to be dead-lettered again, for ever. One of a newer version (a rolling deploy)
    is not broken: its row stays unfinished, for a worker that reads it."""
    broken, newer = await publish(2, task="never_run")
    client: Any = redis
    await client.xtrim(STREAM, maxlen=0)
    doc = {"v": 1, "id": broken, "type": "t", "payload": [1], "created_at": "2026-01-01"}
    await client.xadd(STREAM, {"e": orjson.dumps(doc)})
    await client.xadd(STREAM, {"e": orjson.dumps({**doc, "id": newer, "v": 2, "payload": {}})})
    worker = make_worker()
    await worker.setup()
    await worker.run_once()
    letters = await dead_letters(redis)
    assert [d["reason"] for d in letters] == ["undecodable", "undecodable"]
    assert sorted(d["event_id"] for d in letters) == sorted([broken, ""])
    rows = await pool.fetch(
        "SELECT event_id::text, dead_lettered_at IS NOT NULL AS dead, last_error FROM outbox"
    )
    by_event = {r["event_id"]: r for r in rows}
    assert by_event[broken]["dead"]
    assert by_event[broken]["last_error"].startswith("undecodable: ")
    assert not by_event[newer]["dead"]


async def test_an_error_text_no_store_takes_as_it_is_still_dead_lettered(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, publish: Any, make_worker: MakeWorker
) -> None:
    (event_id,) = await publish(1, task="garbled")
    worker = make_worker()
    await worker.setup()
    await worker.run_once()
    (dead,) = await dead_letters(redis)
    assert dead["reason"] == "permanent_error"
    assert dead["error"].startswith("PermanentError: 550 Bo")
    assert await pending_count(redis) == 0
    last_error = await pool.fetchval("SELECT last_error FROM outbox WHERE event_id = $1", event_id)
    assert "550 Bo" in last_error


async def test_task_timeout_counts_as_a_failure(
    redis: aioredis.Redis, publish: Any, make_worker: MakeWorker
) -> None:
    await publish(1, task="slow")
    worker = make_worker(max_attempts=1)
    await worker.setup()
    started = time.monotonic()
    await worker.run_once()
    assert time.monotonic() - started < 3  # the 0.2 s route timeout, not the 5 s sleep
    (dead,) = await dead_letters(redis)
    assert dead["reason"] == "max_attempts"
    assert "timed out after 0.2s" in dead["error"]


async def test_timeouts_hit_only_the_late_handlers_and_leave_no_trace_on_the_task(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """Timeouts come from one sweeper, not a timer per handler: check what it must keep."""
    await publish(2, task="slow")
    await publish(2, task="masks_cancel", start=2)
    await publish(1, task="own_timeout", start=4)
    await publish(20, task="quick", start=5)
    worker = make_worker()
    await worker.setup()
    cancelling: list[int] = []
    original = worker._run_handler

    async def run_and_inspect(*args: Any) -> None:
        await original(*args)
        task = asyncio.current_task()
        assert task is not None
        cancelling.append(task.cancelling())

    worker._run_handler = run_and_inspect  # type: ignore[method-assign,assignment]
    started = time.monotonic()
    assert await worker.run_once() == 25
    assert time.monotonic() - started < 3  # the 0.2 s timeouts, not the 5 s sleeps
    assert cancelling == [0] * 25  # the sweeper's cancellations were taken back
    assert [c for c in rec.calls if c[0] == "quick"] == [("quick", 1)] * 20
    assert await pending_count(redis) == 5  # parked for retry: 2 slow, 2 masking, 1 own
    assert worker._deadlines == {} and worker._timed_out == set()


async def test_a_handler_masking_its_timeout_still_counts_as_timed_out(
    redis: aioredis.Redis, publish: Any, make_worker: MakeWorker
) -> None:
    await publish(1, task="masks_cancel")
    await publish(1, task="own_timeout", start=1)
    worker = make_worker(max_attempts=1)
    await worker.setup()
    await worker.run_once()
    errors = sorted(d["error"] for d in await dead_letters(redis))
    # The worker's timeout says so; a handler's own TimeoutError keeps its message.
    assert errors == ["TimeoutError: SMTP server did not answer", "timed out after 0.2s"]


async def test_a_handler_returning_after_its_timeout_is_done_only_if_it_says_so(
    redis: aioredis.Redis, pool: asyncpg.Pool[Any], publish: Any, make_worker: MakeWorker
) -> None:
    """Returning after its timeout's cancellation, a handler may have stopped half way:
    timed out, as before. One that says its work is done (spend_cancellation(), as the
    email handler does once the server took the message and it is recorded) is done."""
    (half_way,) = await publish(1, task="returns_on_cancel")
    (done,) = await publish(1, task="done_on_cancel", start=1)
    (spent_earlier,) = await publish(1, task="spent_before", start=2)
    worker = make_worker(max_attempts=1)
    await worker.setup()
    assert await worker.run_once() == 3
    dead = {d["event_id"]: d["error"] for d in await dead_letters(redis)}
    # A cancellation spent before the worker's own says nothing about it.
    assert dead == {half_way: "timed out after 0.2s", spent_earlier: "timed out after 0.2s"}
    completed = await pool.fetchval(
        "SELECT completed_at IS NOT NULL FROM outbox WHERE event_id = $1", done
    )
    assert completed
    assert await pending_count(redis) == 0


async def test_crashed_workers_entries_are_taken_over_after_visibility_timeout(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    await publish(10)
    taken = await delivered_to(redis, "crashed", 10)  # delivered to a worker that then died
    assert len(taken) == 10
    worker = make_worker(visibility_timeout_seconds=0.5)
    await worker.setup()
    assert await worker.run_once() == 0  # not yet: they may still be in progress
    await asyncio.sleep(0.6)
    # Orphans are taken over one at a time, each run alone.
    assert [await worker.run_once() for _ in range(11)] == [1] * 10 + [0]
    assert sorted(int(i) for i, _ in rec.calls) == list(range(10))
    assert all(a == 2 for _, a in rec.calls)  # the second delivery of each
    assert rec.max_running == 1
    assert await pending_count(redis) == 0


async def test_an_entry_deleted_while_pending_is_acknowledged_not_stuck(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """XDEL (or a trim) of an entry a dead worker held: taking it over must clear it from
    the pending list, or it is claimed again forever and trimming stops at it."""
    await publish(2)
    taken = await delivered_to(redis, "crashed", 2)
    client: Any = redis
    await client.xdel(STREAM, taken[0].id)
    worker = make_worker(visibility_timeout_seconds=0.2)
    await worker.setup()
    await asyncio.sleep(0.3)
    # One orphan a time. The deleted one's takeover runs nothing (and on Redis 7 claims
    # nothing: XCLAIM drops it from the pending list itself), so a pass may take none.
    for _ in range(10):
        await worker.run_once()
        if await _pending_is(redis, 0):
            break
    assert await _pending_is(redis, 0)
    assert [int(i) for i, _ in rec.calls] == [1]  # the deleted one had nothing to run


@pytest.mark.parametrize("max_attempts", [3, 20])
async def test_an_entry_that_keeps_killing_its_workers_is_dead_lettered(
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
    make_worker: MakeWorker,
    max_attempts: int,
) -> None:
    """A handler that crashes the process never reaches the failure count: each takeover
    only adds a delivery. Past 3 deliveries (max_attempts, or WORKER_MAX_CRASH_DELIVERIES
    where the attempts are more, as the default 20 are), the last of them run alone, it is
    not run again."""
    await publish(1)
    q = StreamQueue(redis, "default")
    await q.ensure_group()
    (entry,) = await q.read("died_1", 1, None)
    client: Any = redis
    for name in ("died_2", "died_3"):  # two more workers took it over and died
        await client.xclaim(STREAM, CONSUMER_GROUP, name, 0, [entry.id])
    await q.mark_alone("died_3", entry.id, 3)  # died_3 ran its third delivery alone
    worker = make_worker(visibility_timeout_seconds=0.2, max_attempts=max_attempts)
    await worker.setup()
    await asyncio.sleep(0.3)
    await worker.run_once()
    await eventually(lambda: _pending_is(redis, 0), timeout=5)
    assert rec.calls == []
    (dead,) = await dead_letters(redis)
    assert dead["reason"] == "max_attempts"
    assert dead["attempts"] == "4"


async def test_an_orphan_past_its_attempts_that_never_ran_alone_runs_alone_first(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """Entry 0 failed twice, and its third delivery (max_attempts 3) was in flight beside
    entry 1 when 1 killed the worker: 0 is an orphan past its attempts, but it never ran
    alone, so it may not be what killed the worker. It runs (alone), it is not
    dead-lettered as the killer."""
    await publish(2)
    beside, _ = await delivered_to(redis, "w1", 2)
    client: Any = redis
    await client.xclaim(STREAM, CONSUMER_GROUP, "w1", 0, [beside.id], retrycount=3, justid=True)
    worker = make_worker(max_attempts=3)
    async with running(worker):
        await eventually(lambda: _pending_is(redis, 0), timeout=5)
    assert await dead_letters(redis) == []
    assert ("0", 4) in rec.calls
    assert rec.company["0"] == 1


async def test_an_orphan_held_through_a_crash_it_did_not_run_in_is_not_blamed(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """w1 holds orphan 0 (it ran alone before, and its worker died) while entries 1 and 2
    run, and one of them kills w1. 0 never ran in w1: the next worker runs it alone
    instead of dead-lettering it, although it is past max_attempts (1 here)."""
    worker, _ = await _orphan_beside_slow_entries(redis, publish, rec, make_worker, 5.0, True)
    for t in [*worker._tasks, *worker._inflight.values()]:
        t.cancel()  # the process dies: nothing runs any more, nothing is handed back
    await asyncio.gather(*worker._tasks, *worker._inflight.values(), return_exceptions=True)
    other = make_worker(consumer_name="w2", max_attempts=1, visibility_timeout_seconds=0.3)
    await other.setup()
    await asyncio.sleep(0.4)
    while await other.run_once():
        pass
    assert await dead_letters(redis) == []
    assert ("0", 3) in rec.calls  # read by the dead worker, held by w1, then w2


async def test_parked_retries_that_are_not_due_do_not_hide_a_dead_workers_entries(
    redis: aioredis.Redis, publish: Any, make_worker: MakeWorker
) -> None:
    """Entries parked for a long backoff sit at the start of the pending list, idle longer
    than the visibility timeout: a scan of one page from the start saw only them, and the
    dead worker's entry behind them waited for as long as their backoffs."""
    orphan = await park_then_orphan(redis, publish, 6)
    worker = await long_backoff_worker(make_worker, concurrency=2)
    taken = await worker.reclaim_once()
    assert [e.id for e in taken] == [orphan.id]


async def test_reclaim_passes_go_round_a_pending_list_longer_than_one_pass(
    redis: aioredis.Redis, publish: Any, make_worker: MakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More parked entries than one pass reads (one page of 17 here, as thousands during an
    SMTP outage against ten pages): the next pass goes on where the last stopped."""
    monkeypatch.setattr(consumer_mod, "RECLAIM_SCAN_PAGES", 1)
    orphan = await park_then_orphan(redis, publish, 20)
    worker = await long_backoff_worker(make_worker, concurrency=1)
    assert await worker.reclaim_once() == []  # one page of parked entries, none due
    assert [e.id for e in await worker.reclaim_once()] == [orphan.id]


async def park_then_orphan(redis: aioredis.Redis, publish: Any, parked: int) -> Entry:
    """`parked` entries parked for retry (taken, then failed), then one held by a worker
    that died; that one is returned."""
    await publish(parked)
    q = StreamQueue(redis, "default")
    await q.ensure_group()
    await q.read("earlier", parked, None)
    await q.park_for_retry("earlier", await _pending_ids(redis))
    await publish(1, start=100)
    (orphan,) = await q.read("crashed", 1, None)
    return orphan


async def long_backoff_worker(make_worker: MakeWorker, concurrency: int) -> Worker:
    """A worker whose parked retries wait 100 s or more and whose visibility timeout, 0.2 s,
    has passed for every entry taken before it."""
    worker = make_worker(
        concurrency=concurrency,
        visibility_timeout_seconds=0.2,
        retry_backoff_base_seconds=100,
        retry_backoff_max_seconds=300,
    )
    await worker.setup()
    await asyncio.sleep(0.3)
    return worker


async def _pending_ids(redis: aioredis.Redis) -> list[str]:
    client: Any = redis
    rows = await client.xpending_range(STREAM, CONSUMER_GROUP, min="-", max="+", count=100)
    return [r["message_id"].decode() for r in rows]


async def test_slow_handler_renews_its_claim_and_runs_once(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    await publish(1)
    rec.sleep = 1.5  # five times the visibility timeout
    a = make_worker(consumer_name="a", visibility_timeout_seconds=0.3)
    b = make_worker(consumer_name="b", visibility_timeout_seconds=0.3)
    await a.start()
    await eventually(lambda: _is(len(rec.calls) == 1))
    await b.start()
    try:
        await eventually(lambda: _pending_is(redis, 0), timeout=10)
    finally:
        await a.stop()
        await b.stop()
    assert rec.calls == [("0", 1)]
    assert rec.max_running == 1


async def test_restarted_consumer_reads_its_own_pending_first(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    await publish(4)
    await delivered_to(redis, "w1", 4)  # w1 took them, then its container restarted
    worker = make_worker()
    async with running(worker):
        await eventually(lambda: _pending_is(redis, 0))
    assert sorted(int(i) for i, _ in rec.calls) == [0, 1, 2, 3]
    assert all(a == 2 for _, a in rec.calls)


async def test_a_restart_runs_its_own_pending_entries_alone_before_new_ones(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """What the consumer held when its process died may include the entry that killed
    it: each runs alone, and new entries wait until they are done."""
    await publish(4)
    await delivered_to(redis, "w1", 4)  # w1 took them, then its container restarted
    await publish(4, start=4)  # new entries, not yet read
    rec.sleep = 0.05
    worker = make_worker(concurrency=4)
    async with running(worker):
        await eventually(lambda: _is(len(rec.calls) == 8 and rec.running == 0), timeout=10)
        await eventually(lambda: _pending_is(redis, 0))
    assert sorted(int(i) for i, _ in rec.calls[:4]) == [0, 1, 2, 3]
    assert all(rec.company[str(i)] == 1 for i in range(4))
    assert all(a == 2 for _, a in rec.calls[:4])
    assert rec.max_running == 4  # the new ones, together
    assert all(a == 1 for _, a in rec.calls[4:])


async def _owner(redis: aioredis.Redis, entry_id: str) -> tuple[str, int, int] | None:
    """Who holds a pending entry: (consumer, deliveries, idle ms); None if not pending."""
    client: Any = redis
    for r in await client.xpending_range(STREAM, CONSUMER_GROUP, entry_id, entry_id, 1):
        return r["consumer"].decode(), r["times_delivered"], r["time_since_delivered"]
    return None


async def _orphan_beside_slow_entries(
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
    make_worker: MakeWorker,
    slow: float,
    ran_alone: bool = False,
) -> tuple[Worker, str]:
    """Entry 0 held by a dead worker; entries 1 and 2 (`slow` seconds each) running in the
    started worker "w1" when it finds the orphan. Returns once w1 holds the orphan."""
    await publish(1)
    q = StreamQueue(redis, "default")
    await q.ensure_group()
    (orphan,) = await q.read("dead", 1, None)
    if ran_alone:
        await q.mark_alone("dead", orphan.id, 1)  # the dead worker ran it alone
    rec.sleep_for = {"1": slow, "2": slow}
    worker = make_worker(concurrency=4, visibility_timeout_seconds=0.3)
    await publish(2, start=1)
    await worker.start()

    async def held_by_w1() -> bool:
        owner = await _owner(redis, orphan.id)
        return owner is not None and owner[0] == "w1"

    await eventually(held_by_w1, timeout=5)
    return worker, orphan.id


async def test_an_orphan_found_while_work_runs_is_held_then_run_alone(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """The worker takes the orphan over at once, so that no other worker stops for it
    too, starts no new read until what runs has ended, then runs it alone."""
    worker, _ = await _orphan_beside_slow_entries(redis, publish, rec, make_worker, 0.6)
    try:
        assert rec.running == 2
        assert "0" not in [i for i, _ in rec.calls]  # held, not run beside them
        await publish(2, start=3)  # new work, while the worker drains
        await eventually(lambda: _is(len(rec.calls) == 5 and rec.running == 0), timeout=10)
        await eventually(lambda: _pending_is(redis, 0))
    finally:
        await worker.stop()
    order = [i for i, _ in rec.calls]
    assert order.index("0") > max(order.index("1"), order.index("2"))  # held meanwhile
    assert rec.company["0"] == 1  # nothing ran beside it (a read already under way may
    # bring one of 3 and 4 in first: the orphan then waits for it too)
    assert ("0", 2) in rec.calls


async def test_a_stop_hands_a_held_orphan_back_as_an_orphan_uncounted(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """Stopped while it holds an orphan it has not run: the orphan stays with this
    consumer, idle, so that the next worker takes it over at once and runs it alone; the
    delivery it never ran is not counted."""
    worker, orphan = await _orphan_beside_slow_entries(redis, publish, rec, make_worker, 5.0)
    await worker.stop(grace=0.2)
    owner = await _owner(redis, orphan)
    assert owner is not None
    consumer, deliveries, idle_ms = owner
    assert (consumer, deliveries) == ("w1", 1)
    assert idle_ms > 10**9
    rec.sleep_for = {}
    other = make_worker(consumer_name="w2")
    await other.setup()
    assert await other.run_once() == 1  # the orphan, alone, before anything else
    assert rec.calls[-1] == ("0", 2)


async def test_a_read_under_way_when_an_orphan_is_taken_is_waited_for(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """An idle worker waits in XREADGROUP BLOCK when it finds an orphan: what that read
    brings must not start beside the orphan, so the orphan waits for the read."""
    await publish(1)
    await delivered_to(redis, "dead", 1)
    rec.sleep_for = {"0": 1.0}
    worker = make_worker(concurrency=4, visibility_timeout_seconds=0.5, block_ms=2000)
    async with running(worker):
        await eventually(lambda: _is(worker._held_orphan is not None), timeout=5)
        await publish(2, start=1)  # the read under way returns these
        await eventually(lambda: _is(len(rec.calls) == 3 and rec.running == 0), timeout=10)
    assert rec.company["0"] == 1, rec.company


async def test_a_handler_that_ignores_its_timeout_does_not_hold_an_orphan_back(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """A handler cancelled by its timeout that does not give way must not keep the orphan
    (and the worker's reading) waiting for ever."""
    await publish(1, start=5)
    await delivered_to(redis, "dead", 1)
    await publish(1, task="stubborn")
    worker = make_worker(visibility_timeout_seconds=0.5)
    async with running(worker, rec):
        await eventually(lambda: _is(("5", 2) in rec.calls), timeout=5)


async def test_a_stop_renews_its_held_orphan_until_it_hands_it_back(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """While a stop waits for its handlers, the orphan it holds stays renewed, so no other
    worker takes it over meanwhile; once handed back, another takes it over, once."""
    worker, _ = await _orphan_beside_slow_entries(redis, publish, rec, make_worker, 1.5)
    other = make_worker(consumer_name="w2", visibility_timeout_seconds=0.3)
    async with running(other):
        await worker.stop(grace=5)  # longer than the visibility timeout
        await eventually(lambda: _is(("0", 2) in rec.calls and rec.running == 0), timeout=5)
        await eventually(lambda: _pending_is(redis, 0))
    assert [c for c in rec.calls if c[0] == "0"] == [("0", 2)]
    assert rec.company["0"] == 1


@pytest.mark.expect_loop_failures
async def test_an_own_orphan_whose_outcome_cannot_be_recorded_holds_up_nothing(
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
    make_worker: MakeWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a restart, an own orphan whose dead letter cannot be written stays pending
    (taken over after the visibility timeout, as any entry whose bookkeeping failed): it
    is not read again at once, in a loop, while new work waits."""
    await publish(1, task="permanent")
    (entry,) = await delivered_to(redis, "w1", 1)  # w1 held it, then its container restarted
    await publish(3, start=10)
    worker = make_worker()

    async def failing(*_args: Any, **_kwargs: Any) -> str:
        raise RedisConnectionError("the dead-letter MULTI failed")

    monkeypatch.setattr(worker.queue, "dead_letter", failing)
    async with running(worker):
        await eventually(lambda: _is(len(rec.calls) == 3), timeout=5)
    owner = await _owner(redis, entry.id)
    assert owner is not None
    assert owner[:2] == ("w1", 2)  # read once before the restart, once after


async def test_a_stop_keeps_its_grace_while_an_acknowledgement_hangs(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
    make_worker: MakeWorker,
) -> None:
    """Postgres hanging on the completion UPDATE of the ack loop's flush: the stop still
    ends within its grace (the entries stay pending and are taken over later)."""
    stalled = StalledCompletions(pool)
    await publish(1)
    worker = make_worker()
    worker.bookkeeping = stalled  # type: ignore[assignment]
    await worker.start()
    await eventually(lambda: _is(len(rec.calls) == 1))
    await asyncio.sleep(0.1)  # the ack loop is in its flush
    started = time.monotonic()
    try:
        await asyncio.wait_for(worker.stop(grace=1.0), 10)
    finally:
        stopped_in = time.monotonic() - started
        stalled.release.set()
    await eventually(lambda: _pending_is(redis, 0))  # the flush went on once released
    assert stopped_in < 3


async def test_renewing_or_handing_over_never_takes_an_entry_another_worker_took_over(
    redis: aioredis.Redis, publish: Any
) -> None:
    """A worker stalled past the visibility timeout, another took its entry over: the
    stalled one's next heartbeat, a retry it parks, or the orphans it hands back when it
    stops must leave it there, or both would run it."""
    await publish(2)
    q = StreamQueue(redis, "default")
    await q.ensure_group()
    mine, taken_over = await q.read("stalled", 2, None)
    client: Any = redis
    await client.xclaim(STREAM, CONSUMER_GROUP, "other", 0, [taken_over.id])
    assert await q.renew("stalled", [mine.id, taken_over.id]) == 1
    assert await q.park_for_retry("stalled", [taken_over.id], due_now=True) == 0
    assert await q.hand_back_orphans("stalled", [mine.id, taken_over.id], {}) == 1
    owners = {
        r["message_id"].decode(): r["consumer"].decode()
        for r in await client.xpending_range(STREAM, CONSUMER_GROUP, min="-", max="+", count=10)
    }
    assert owners == {mine.id: "stalled", taken_over.id: "other"}


async def test_a_stalled_worker_leaves_the_outcome_of_an_entry_taken_over_to_its_holder(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
    make_worker: MakeWorker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker stalled past the visibility timeout, its entry taken over by another; its
    handler then fails for good. Dead-lettering the entry the other now runs would give the
    event two dead letters (the other's run ends the same way), and replaying them would
    run it twice. The stalled one leaves it; the new holder records the outcome, once."""
    gate = asyncio.Event()
    started = asyncio.Event()

    @rec.router.handler("gated_permanent")
    async def gated(_ctx: TaskContext) -> None:
        started.set()
        await gate.wait()
        raise PermanentError("cannot ever work")

    (event_id,) = await publish(1, "gated_permanent")
    client: Any = redis
    stalled = make_worker(consumer_name="stalled")
    await stalled.start()
    try:
        await asyncio.wait_for(started.wait(), 10)
        ((entry_id, _),) = await client.xrange(STREAM)
        # The takeover a stall past the visibility timeout lets another worker make.
        await client.xclaim(STREAM, CONSUMER_GROUP, "other", 0, [entry_id])
        gate.set()
        await eventually(lambda: _outcome_logged(caplog))
    finally:
        await stalled.stop()
    assert await dead_letters(redis) == []
    (held,) = await client.xpending_range(STREAM, CONSUMER_GROUP, "-", "+", 10)
    assert held["consumer"] == b"other"
    assert await _dead_lettered_at(pool, event_id) is None
    # The new holder runs it (a restart runs its own pending entries) and gives up on it.
    other = make_worker(consumer_name="other")
    await other.start()
    try:
        await eventually(lambda: _pending_is(redis, 0))
    finally:
        await other.stop()
    (letter,) = await dead_letters(redis)
    assert letter["event_id"] == event_id
    assert await _dead_lettered_at(pool, event_id) is not None


async def test_a_dead_mark_whose_entry_was_taken_over_meanwhile_is_taken_back(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    publish: Any,
    make_worker: MakeWorker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The dead mark in Postgres took longer than the visibility timeout (a slow Postgres)
    and another worker took the entry over before the dead letter: the dead letter is not
    written, and the mark goes too, or the row would say dead-lettered while the new holder
    runs the event (and restore-lost would publish it again)."""
    (event_id,) = await publish(1, "permanent")
    client: Any = redis
    worker = make_worker(consumer_name="slow")
    real = worker.queue.dead_letter

    async def taken_over_first(entry: Entry, **kw: Any) -> str | None:
        await client.xclaim(STREAM, CONSUMER_GROUP, "other", 0, [entry.id])
        return await real(entry, **kw)

    monkeypatch.setattr(worker.queue, "dead_letter", taken_over_first)
    await worker.start()
    try:
        await eventually(lambda: _outcome_logged(caplog))
    finally:
        await worker.stop()
    assert await dead_letters(redis) == []
    assert await _pending_held_by(redis, "other")
    row = await pool.fetchrow(
        "SELECT dead_lettered_at, last_error FROM outbox WHERE event_id = $1", event_id
    )
    assert row is not None
    assert (row["dead_lettered_at"], row["last_error"]) == (None, None)


@pytest.mark.parametrize("redis_is", ["refusing", "silent"])
async def test_a_scrape_with_redis_down_still_serves_the_metrics(
    redis_is: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker refreshes its stream gauges from Redis before each scrape. With Redis
    down (refused) or silent (a partition: no answer for the socket timeout, past
    Prometheus's 10 s scrape timeout), a failed scrape marked every worker down (up 0,
    NoWorkerConsuming) and hid its loop_errors_total. The scrape answers, within the
    refresh's timeout."""
    silent = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1] if redis_is == "silent" else free_port()
    if redis_is == "refusing":
        silent.close()
    dead_redis = create_redis(f"redis://127.0.0.1:{port}/0")
    queue = StreamQueue(dead_redis, "default")

    async def scrape() -> None:
        await refresh_gauges(queue)

    probe_port = free_port()
    probe = ProbeServer("127.0.0.1", probe_port, before_scrape=scrape)
    await probe.start()
    try:
        started = time.monotonic()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{probe_port}/metrics") as resp,
        ):
            assert resp.status == 200
            assert "worker_pending_entries" in await resp.text()
        assert time.monotonic() - started < REFRESH_TIMEOUT_SECONDS + 2
    finally:
        await probe.stop()
        await dead_redis.aclose()
        silent.close()
    assert any(r.msg == "metrics_refresh_failed" for r in caplog.records)


async def test_a_late_dead_mark_leaves_the_new_holders_outcome_alone(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    publish: Any,
    make_worker: MakeWorker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker renews its entry to give up on it, then stalls past the visibility timeout
    before its mark; another takes the entry over and records its own dead letter (mark,
    dead letter, acknowledgement). The late mark must not replace that one: taken back
    when its dead letter is refused, it would leave the row in flight beside the dead
    letter, for the reconciler to publish again."""
    (event_id,) = await publish(1, "permanent")
    client: Any = redis
    worker = make_worker(consumer_name="slow")
    real_fetchval = asyncpg.pool.Pool.fetchval
    stalled: list[bool] = []

    async def other_first(self: Any, query: str, *args: Any) -> Any:
        if query == consumer_mod._MARK_DEAD and not stalled:
            stalled.append(True)
            ((sid, fields),) = await client.xrange(STREAM)
            entry = Entry(sid.decode(), fields, 1)
            await client.xclaim(STREAM, CONSUMER_GROUP, "other", 0, [entry.id])
            assert await real_fetchval(self, query, *args) is not None  # the other's mark
            assert await StreamQueue(redis, "default").dead_letter(
                entry,
                consumer="other",
                reason="permanent_error",
                error="the other's",
                event_id=event_id,
                task_type="permanent",
            )
        return await real_fetchval(self, query, *args)

    monkeypatch.setattr(asyncpg.pool.Pool, "fetchval", other_first)
    await worker.start()
    try:
        await eventually(lambda: _outcome_logged(caplog))
    finally:
        await worker.stop()
    (letter,) = await dead_letters(redis)
    assert letter["error"] == "the other's"
    assert await _dead_lettered_at(pool, event_id) is not None


async def _pending_held_by(redis: aioredis.Redis, consumer: str) -> bool:
    client: Any = redis
    rows = await client.xpending_range(STREAM, CONSUMER_GROUP, "-", "+", 10)
    return bool(rows) and all(r["consumer"].decode() == consumer for r in rows)


@pytest.mark.expect_loop_failures
async def test_a_failed_final_acknowledgement_does_not_cut_the_stop_short(
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
    make_worker: MakeWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis failing the last XACK of a stop: the entries stay pending (taken over later,
    their handlers are idempotent), and the app's shutdown hooks still run."""
    shut: list[bool] = []

    @rec.router.on_shutdown
    async def closed(_state: dict[str, Any]) -> None:
        shut.append(True)

    await publish(2)
    worker = make_worker()

    async def refused(_ids: list[str]) -> None:
        raise RedisConnectionError("Redis went away")

    monkeypatch.setattr(worker.queue, "ack", refused)
    await worker.start()
    await eventually(lambda: _is(len(rec.calls) == 2))
    await worker.stop(grace=2)  # the acks of both are still owed: the last flush fails
    assert shut == [True]
    assert await pending_count(redis) == 2


async def test_stop_finishes_in_flight_within_grace_and_hands_back_the_rest(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    await publish(2)
    rec.sleep = 3.0
    a = make_worker(consumer_name="a")
    await a.start()
    await eventually(lambda: _is(rec.running == 2))
    started = time.monotonic()
    await a.stop(grace=0.3)
    assert time.monotonic() - started < 2
    assert not a.running
    client: Any = redis
    parked = await client.xpending_range(
        STREAM, CONSUMER_GROUP, "-", "+", 10, consumername=RETRY_PARKING_CONSUMER
    )
    assert len(parked) == 2  # handed back, not left to time out
    # The deliveries the stop cut short do not count as attempts.
    assert [p["times_delivered"] for p in parked] == [0, 0]
    rec.sleep = 0
    b = make_worker(consumer_name="b")
    await b.setup()
    assert await b.run_once() == 2  # taken at once, no visibility timeout to wait
    assert await pending_count(redis) == 0
    assert [attempt for _, attempt in rec.calls[2:]] == [1, 1]


async def test_stop_waits_for_handlers_that_finish_in_time(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
    make_worker: MakeWorker,
) -> None:
    await publish(3)
    rec.sleep = 0.3
    w = make_worker()
    await w.start()
    await eventually(lambda: _is(rec.running == 3))
    await w.stop(grace=5)
    assert await pending_count(redis) == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE completed_at IS NOT NULL") == 3


async def test_worker_recreates_a_group_redis_lost(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    w = make_worker()
    async with running(w):
        await redis.flushall()  # stream and group gone
        await asyncio.sleep(0.3)
        await publish(3)
        await eventually(lambda: _is(len(rec.calls) == 3))


async def acked_then_pending(
    publish: Any, make_worker: MakeWorker, published: int, acked: int, pending: int
) -> tuple[StreamQueue, list[Entry]]:
    """`published` entries: the first `acked` run and acknowledged by a worker, the next
    `pending` delivered to consumer "other" and left unacknowledged."""
    await publish(published)
    w = make_worker(read_count=acked)
    await w.setup()
    await w.run_once()
    return w.queue, await w.queue.read("other", pending, None)


async def test_trim_keeps_everything_not_yet_acknowledged(
    redis: aioredis.Redis, publish: Any, make_worker: MakeWorker
) -> None:
    q, delivered = await acked_then_pending(publish, make_worker, 10, acked=6, pending=2)
    pending_ids = [e.id for e in delivered]
    trimmed = await q.trim_acknowledged()
    assert trimmed == 6
    client: Any = redis
    left = [sid.decode() for sid, _ in await client.xrange(STREAM)]
    assert left[:2] == pending_ids
    assert len(left) == 4  # 2 pending + 2 never delivered
    stats = await refresh_gauges(q)
    assert stats["stream_length"] == 4
    assert stats["pending"] == 2
    assert stats["consumers"] == 2


async def test_trim_survives_the_last_pending_entry_acked_between_its_reads(
    redis: aioredis.Redis, publish: Any, make_worker: MakeWorker
) -> None:
    """XINFO GROUPS says an entry is pending; it is acknowledged before XPENDING runs."""
    # The first acked, the second pending, the third never delivered.
    q, (entry,) = await acked_then_pending(publish, make_worker, 3, acked=1, pending=1)
    client: Any = redis
    real_xinfo_groups = client.xinfo_groups

    async def xinfo_then_ack(stream: str) -> Any:
        groups = await real_xinfo_groups(stream)
        await client.xack(STREAM, CONSUMER_GROUP, entry.id)  # the race, injected
        return groups

    client.xinfo_groups = xinfo_then_ack
    try:
        trimmed = await q.trim_acknowledged()
    finally:
        del client.xinfo_groups
    assert trimmed == 1  # the first; the second, last delivered, is MINID's bound
    assert await client.xlen(STREAM) == 2


async def test_gone_consumers_holding_nothing_are_removed(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
) -> None:
    await publish(1)
    await delivered_to(redis, "holder", 1)
    q = StreamQueue(redis, "default")
    client: Any = redis
    for name in ("idle", "me"):
        await client.xgroup_createconsumer(STREAM, CONSUMER_GROUP, name)
    await asyncio.sleep(0.3)
    # Idle 0.3 s: past 0.2 s, not past 1 s (the comparison is in milliseconds). "holder"
    # keeps its pending entry, and "me" is the worker itself.
    assert await remove_gone_consumers(q, 1.0, me="me") == []
    assert await remove_gone_consumers(q, 0.2, me="me") == ["idle"]


def run_worker_module(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker_service", *argv],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=60,
        check=False,
    )


def test_unknown_app_and_bad_settings_exit_with_a_message() -> None:
    out = run_worker_module({}, "--app", "nope:router")
    assert out.returncode == 2
    assert "DATABASE_URL" in out.stderr
    urls = {"DATABASE_URL": "postgresql://h/db", "REDIS_URL": "redis://h"}
    out = run_worker_module(urls, "--app", "nope:router")
    assert out.returncode == 2
    assert "No module named 'nope'" in out.stderr
    # The default app's own settings too, before connecting (nothing listens there).
    env = {
        "DATABASE_URL": f"postgresql://127.0.0.1:{free_port()}/db",
        "REDIS_URL": "redis://h",
        "PUBLIC_BASE_URL": "http://signup.test",
    }
    out = run_worker_module(env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "worker: invalid configuration: SMTP_URL: Field required"


async def test_entries_this_worker_abandoned_are_taken_back(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
    pg_server: PostgresServer,
    redis_server: RedisServer,
) -> None:
    """A claim renewal can race with parking and leave an entry owned by this worker but
    not running; after the visibility timeout it is taken back, even with one worker."""
    await publish(3)
    s = worker_settings(pg_server, redis_server, visibility_timeout_seconds=0.3)
    q = StreamQueue(redis, "default")
    await q.ensure_group()
    await q.read(s.consumer_name, 3, None)  # owned by "w1", not running anywhere
    worker = Worker(rec.router, pool, redis, s)
    await asyncio.sleep(0.4)
    assert [await worker.run_once() for _ in range(4)] == [1, 1, 1, 0]  # each alone
    assert sorted(int(i) for i, _ in rec.calls) == [0, 1, 2]


async def test_a_dead_letter_is_replayed_once_even_when_two_replays_race(
    redis: aioredis.Redis, publish: Any, make_worker: MakeWorker
) -> None:
    (event_id,) = await publish(1, task="permanent")
    worker = make_worker()
    await worker.setup()
    await worker.run_once()
    client: Any = redis
    ((dead_id, fields),) = await client.xrange(DEAD)
    before = await redis.xlen(STREAM)
    results = await asyncio.gather(
        *(worker.queue.replay_dead(dead_id.decode(), fields[b"e"], event_id) for _ in range(5))
    )
    assert sum(r is not None for r in results) == 1
    assert await redis.xlen(STREAM) == before + 1
    assert await redis.xlen(DEAD) == 0


async def test_a_replay_points_the_dedupe_key_at_its_entry_with_an_expiry(
    redis: aioredis.Redis, publish: Any, make_worker: MakeWorker
) -> None:
    """The replayed entry's id goes into the event's dedupe key, with the relay's key's
    expiry while it lives; once that has expired, in a key made anew with an expiry of its
    own (the reconciler finds the replayed entry through it: see test_ctl.py)."""
    first, second = await publish(2, task="permanent")
    worker = make_worker()
    await worker.setup()
    await worker.run_once()
    client: Any = redis
    dead = {f[b"event_id"].decode(): (i.decode(), f[b"e"]) for i, f in await client.xrange(DEAD)}
    key = dedupe_key(first, "default")
    await redis.expire(key, 500)  # what is left of the relay's key
    await redis.delete(dedupe_key(second, "default"))  # the relay's key has expired
    new_id = await worker.queue.replay_dead(dead[first][0], dead[first][1], first)
    assert new_id is not None
    assert await client.get(key) == new_id.encode()
    assert 0 < await redis.ttl(key) <= 500  # kept
    again = await worker.queue.replay_dead(dead[second][0], dead[second][1], second)
    assert again is not None
    made = dedupe_key(second, "default")
    assert await client.get(made) == again.encode()
    assert REPLAY_DEDUPE_TTL_SECONDS - 60 < await redis.ttl(made) <= REPLAY_DEDUPE_TTL_SECONDS


async def test_a_shutdown_cancel_is_not_mistaken_for_a_timeout(
    redis: aioredis.Redis, publish: Any, make_worker: MakeWorker
) -> None:
    """Cancelled at the end of a shutdown's grace, a handler's cleanup then runs past its
    deadline and the sweeper cancels it too: the task must end cancelled, not be counted
    as a timed-out attempt (with one attempt allowed, that would dead-letter it)."""
    await publish(1, task="slow_cleanup")
    worker = make_worker(max_attempts=1)
    s = worker.settings
    await worker.setup()
    await worker._take(await worker.queue.read(s.consumer_name, 10, None))
    (task,) = worker._inflight.values()
    await asyncio.sleep(0.05)
    task.cancel()  # what stop() does once the grace is over
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert await dead_letters(redis) == []
    pending: Any = await redis.xpending_range(STREAM, CONSUMER_GROUP, "-", "+", 10)
    assert [p["consumer"] for p in pending] == [s.consumer_name.encode()]  # not parked
    assert worker._deadlines == {} and worker._timed_out == set()


async def test_an_orphan_that_ignores_its_timeout_does_not_stall_the_worker(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """The orphan itself times out and does not give way: new work must still run."""
    await publish(1, task="stubborn")
    await delivered_to(redis, "dead", 1)
    worker = make_worker(visibility_timeout_seconds=0.5)
    async with running(worker, rec):
        await eventually(lambda: _is(worker._orphan is not None), timeout=5)
        await publish(3, start=10)
        await eventually(lambda: _is(len(rec.calls) == 3), timeout=5)


async def test_a_stop_keeps_its_grace_when_a_handler_ignores_cancellation(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    await publish(1, task="stubborn")
    worker = make_worker()
    await worker.start()
    await eventually(lambda: _is(bool(worker._timed_out)))  # it timed out, and ignores it
    t0 = time.monotonic()
    stopping = asyncio.create_task(worker.stop(grace=1))
    done, _ = await asyncio.wait([stopping], timeout=8)
    rec.released = True
    await stopping
    assert done, f"stop(grace=1) still running after 8 s (took {time.monotonic() - t0:.1f})"


async def stop_with_redis_stopped(
    worker: Worker, redis_server: RedisServer, ready: Callable[[], Awaitable[bool]]
) -> float:
    """Once `ready`, Redis stops answering (SIGSTOP: a partition, a stuck fsync) and the
    worker stops with 1 s of grace; the seconds the stop took."""
    assert redis_server.proc is not None
    pid = redis_server.proc.pid
    await eventually(ready)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        await worker.stop(grace=1)
        return time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)


# 1 s of grace, at most 1 s for the loops, and the floor (0.5 s) for each later step.
STOP_WITH_REDIS_STOPPED_WITHIN = 1 + 1 + 4 * 0.5 + 1


async def test_a_stop_keeps_its_grace_when_redis_hangs(
    redis_server: RedisServer, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """An entry still runs at the stop: handing it back must not wait out the socket
    timeout (10 s) call after call. Left pending, it is taken over after the visibility
    timeout."""
    await publish(1)
    rec.sleep_for = {"0": 60.0}
    worker = make_worker()
    await worker.start()
    took = await stop_with_redis_stopped(worker, redis_server, lambda: _is(rec.running == 1))
    assert took < STOP_WITH_REDIS_STOPPED_WITHIN, f"stop(grace=1) took {took:.1f} s"


async def test_a_handler_that_ignores_its_timeout_on_its_last_attempt_is_given_up_at_stop(
    redis: aioredis.Redis,
    pool: asyncpg.Pool[Any],
    publish: Any,
    rec: Recorder,
    make_worker: MakeWorker,
) -> None:
    """Its attempts check never runs (the handler never returns): handed back at every
    stop, it would take a slot in worker after worker for ever. On its last attempt and
    past its timeout, the stop dead-letters it instead."""
    (event_id,) = await publish(1, task="stubborn")
    worker = make_worker(max_attempts=1)
    await worker.start()
    try:
        await eventually(lambda: _is(bool(worker._timed_out)))
        await worker.stop(grace=0.3)
    finally:
        rec.released = True
    (dead,) = await dead_letters(redis)
    assert dead["reason"] == "max_attempts"
    assert "did not give way" in dead["error"]
    assert await pending_count(redis) == 0  # acknowledged
    assert await _dead_lettered_at(pool, event_id) is not None


async def test_a_stop_gives_up_on_a_deaf_last_attempt_within_its_grace_when_redis_hangs(
    redis_server: RedisServer, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """The stop's dead-lettering of a handler that ignores its timeout on its last attempt
    keeps to the grace too. Its entry stays pending (dead-lettered when Redis answers, or
    taken over)."""
    await publish(1, task="stubborn")
    worker = make_worker(max_attempts=1)
    await worker.start()
    try:
        took = await stop_with_redis_stopped(
            worker, redis_server, lambda: _is(bool(worker._timed_out))
        )
    finally:
        rec.released = True
    assert took < STOP_WITH_REDIS_STOPPED_WITHIN, f"stop(grace=1) took {took:.1f} s"


async def test_a_handler_that_ignores_its_timeout_shows_in_a_gauge(
    publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """Its entry is renewed like any running one, so no pending-age gauge sees it: the
    overdue gauge does (the HandlerIgnoresItsTimeout alert), and drops when it gives way."""
    await publish(1, task="stubborn")
    worker = make_worker()
    async with running(worker, rec):
        await eventually(lambda: _is(bool(worker._timed_out)))  # its timeout has fired
        await eventually(lambda: _is(REGISTRY.get_sample_value("worker_handlers_overdue") == 1))
        rec.released = True
        await eventually(lambda: _is(REGISTRY.get_sample_value("worker_handlers_overdue") == 0))


async def test_completions_are_recorded_while_handlers_hold_every_connection(
    pool: asyncpg.Pool[Any],
    pg_server: PostgresServer,
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
    make_worker: MakeWorker,
) -> None:
    """A handler holds the handlers' only connection through its work (as the email
    handler does through SMTP): the entries that finished meanwhile are recorded and
    acknowledged on the worker's own connections, not after it lets go."""
    handlers_pool = await create_pool(pg_server.dsn, min_size=1, max_size=1)
    release = asyncio.Event()

    @rec.router.handler("holds_conn", timeout=30)
    async def holds_conn(ctx: TaskContext) -> None:
        async with ctx.pool.acquire():
            await release.wait()

    await publish(1, task="holds_conn")
    await publish(3, start=1)
    worker = make_worker(concurrency=8)
    worker.pool = handlers_pool
    try:
        async with running(worker, rec):
            await eventually(lambda: _is(len(rec.calls) == 3))

            async def recorded() -> bool:
                done = await pool.fetchval(
                    "SELECT count(*) FROM outbox WHERE completed_at IS NOT NULL"
                )
                return bool(done == 3)

            await eventually(recorded, timeout=5)
            assert await pending_count(redis) == 1  # only the one still holding
            release.set()
    finally:
        release.set()
        await handlers_pool.close()


async def test_a_held_orphan_runs_as_soon_as_the_last_live_handler_ends(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """A handler its timeout cancelled that does not give way, and a slow one, run when
    the second reclaim pass (3 s) finds the orphan (idle past 1 s) and holds it. When the
    slow one ends (4 s), the orphan runs at once, not at the next pass (6 s)."""
    await publish(1)  # "0": the orphan
    await delivered_to(redis, "dead", 1)
    await publish(1, task="stubborn")
    await publish(1, start=1)
    rec.sleep_for = {"1": 4.0}
    worker = make_worker(concurrency=4, visibility_timeout_seconds=1.0, reclaim_interval_seconds=3)
    async with running(worker, rec):
        await eventually(lambda: _is(("1", 1) in rec.calls), timeout=5)
        await eventually(lambda: _is(worker._held_orphan is not None), timeout=8)
        await eventually(lambda: _is(rec.running == 0), timeout=5)
        ended = time.monotonic()
        await eventually(lambda: _is(("0", 2) in rec.calls), timeout=10)
        late = time.monotonic() - ended
    assert late < 1, f"the orphan ran {late:.2f} s after the last live handler ended"


async def test_an_orphan_is_recorded_before_the_next_orphan_starts(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """Own orphans E then K after a restart. If K kills the process the moment it starts,
    E's outcome must already be recorded, or E runs again (and its count grows with K's)."""
    await publish(2)
    e, _ = await delivered_to(redis, "w1", 2)  # w1 held both, then its process died
    worker = make_worker()
    snapshot: list[tuple[bool, bool]] = []
    orig = rec.router.get("t")
    assert orig is not None
    inner = orig.handler

    async def handler(ctx: TaskContext) -> None:
        if ctx.payload["i"] == 1:  # K: would os._exit() right here
            unacked = any(sid == e.id for sid, _ in worker._acks)
            owner = await _owner(redis, e.id)  # (an await: the ack loop may move meanwhile)
            snapshot.append((unacked, owner is not None))
        await inner(ctx)

    object.__setattr__(orig, "handler", handler)
    async with running(worker):
        await eventually(lambda: _is(len(rec.calls) == 2), timeout=5)
    assert snapshot == [(False, False)], snapshot


@pytest.mark.expect_loop_failures
async def test_a_read_that_fails_wakes_the_held_orphan(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """The orphan is held while a read is under way; the read fails (a connection reset):
    the orphan runs then, not at the next reclaim pass (3 s later)."""
    await publish(1)
    await delivered_to(redis, "dead", 1)
    worker = make_worker(visibility_timeout_seconds=1.0, reclaim_interval_seconds=3, block_ms=5000)
    real_read = worker.queue.read
    failed: list[float] = []

    async def read(*args: Any) -> list[Entry]:
        if not failed:
            await eventually(lambda: _is(worker._held_orphan is not None), timeout=5)
            await asyncio.sleep(0.1)
            failed.append(time.monotonic())
            raise RedisConnectionError("connection reset")
        return await real_read(*args)

    worker.queue.read = read  # type: ignore[method-assign,assignment]
    async with running(worker):
        await eventually(lambda: _is(("0", 2) in rec.calls), timeout=10)
        late = time.monotonic() - failed[0]
    assert late < 1, f"the held orphan ran {late:.2f} s after the failed read ended"


async def test_a_stop_keeps_its_grace_when_a_second_batch_waits_behind_a_hung_flush(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
    make_worker: MakeWorker,
) -> None:
    stalled = StalledCompletions(pool)
    await publish(2)
    rec.sleep_for = {"1": 0.3}  # completes after the first flush has started (and hung)
    worker = make_worker()
    worker.bookkeeping = stalled  # type: ignore[assignment]
    await worker.start()
    await eventually(lambda: _is(len(rec.calls) == 2 and rec.running == 0))
    await asyncio.sleep(0.1)
    assert worker._acks  # the second completion, waiting behind the hung flush
    started = time.monotonic()
    stopping = asyncio.create_task(worker.stop(grace=1.0))
    done, _ = await asyncio.wait([stopping], timeout=6)
    stopped_in = time.monotonic() - started
    stalled.release.set()
    await stopping
    assert done and stopped_in < 3, f"stop(grace=1) took {stopped_in:.1f} s"


async def test_a_slow_completion_flush_keeps_its_entries_claimed(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
    make_worker: MakeWorker,
) -> None:
    """Postgres slow on the completion UPDATE (a lock, a failover) for longer than the
    visibility timeout: the entries of the batch under way are neither renewed nor seen as
    held, so they are taken over as orphans and run again though they completed."""
    stalled = StalledCompletions(pool)
    await publish(1)
    w1 = make_worker(visibility_timeout_seconds=0.6)
    w1.bookkeeping = stalled  # type: ignore[assignment]
    await w1.start()
    await eventually(lambda: _is(len(rec.calls) == 1))
    w2 = make_worker(consumer_name="w2", visibility_timeout_seconds=0.6)
    await w2.start()
    try:
        await asyncio.sleep(1.5)  # the flush is still under way
    finally:
        stalled.release.set()
        await w2.stop()
        await w1.stop()
    assert rec.calls == [("0", 1)], rec.calls


async def _die(worker: Any) -> None:
    for t in [*worker._tasks, *worker._inflight.values()]:
        t.cancel()  # the process dies: nothing runs any more, nothing is handed back
    await asyncio.gather(*worker._tasks, *worker._inflight.values(), return_exceptions=True)
    if worker._sweeper is not None:
        worker._sweeper.cancel()


async def test_a_mark_from_an_alone_run_that_failed_does_not_blame_a_later_retry(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """max_attempts 3. Delivery 1: beside a killer (dead worker). 2: an orphan, alone
    (marked), fails transiently and is parked. 3: a due retry, beside others, when the
    worker dies of something else. 4: its last delivery did not run alone, so it runs,
    not dead-lettered on the mark delivery 2 left."""
    await publish(1)
    await delivered_to(redis, "dead", 1)
    rec.fail_times = {"0": 1}
    w1 = make_worker(visibility_timeout_seconds=0.3, max_attempts=3)
    await w1.start()
    await eventually(lambda: _is(("0", 2) in rec.calls), timeout=5)
    rec.sleep_for = {"0": 5.0}  # the retry is in flight when w1 dies
    await eventually(lambda: _is(("0", 3) in rec.calls), timeout=5)
    await _die(w1)
    rec.sleep_for = {}
    w2 = make_worker(consumer_name="w2", visibility_timeout_seconds=0.3, max_attempts=3)
    await w2.setup()
    await asyncio.sleep(0.4)
    while await w2.run_once():
        pass
    assert await dead_letters(redis) == [], "dead-lettered unrun on a stale mark"
    assert ("0", 4) in rec.calls


async def test_an_alone_run_a_stop_cut_short_is_not_blamed(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """max_attempts 1. An orphan (delivery 2) runs alone, slowly; a stop cuts it short and
    hands it back uncounted (1). That run did not crash: the next takeover runs it, not
    dead-letters it as 'crashed or stalled' on the mark it left."""
    await publish(1)
    await delivered_to(redis, "dead", 1)
    rec.sleep_for = {"0": 3.0}
    w1 = make_worker(visibility_timeout_seconds=0.3, max_attempts=1)
    await w1.start()
    await eventually(lambda: _is(("0", 2) in rec.calls), timeout=5)
    await w1.stop(grace=0.2)
    rec.sleep_for = {}
    w2 = make_worker(consumer_name="w2", max_attempts=1)
    await w2.setup()
    while await w2.run_once():
        pass
    assert await dead_letters(redis) == [], "a deploy's cut-short run dead-lettered it"


@pytest.mark.expect_loop_failures
async def test_no_read_starts_while_an_orphan_is_being_marked(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """Reads failing (Redis flapping): the fetch loop is in its backoff, not reading, when
    an orphan is found and marked (slowly here). The backoff must not end in a read while
    the mark is set: what it brought would start beside the orphan."""
    await publish(1)
    await delivered_to(redis, "dead", 1)
    await publish(2, start=1)
    rec.sleep_for = {"0": 1.0, "1": 1.0, "2": 1.0}
    w = make_worker(concurrency=4, visibility_timeout_seconds=0.3)
    real_read, real_mark = w.queue.read, w.queue.mark_alone
    marking = asyncio.Event()

    async def read(*a: Any) -> list[Entry]:
        if not marking.is_set():
            raise RedisConnectionError("connection reset")
        return await real_read(*a)

    async def mark_alone(*a: Any) -> bool:
        marking.set()
        await asyncio.sleep(1.0)  # a slow SET while Redis recovers
        return await real_mark(*a)

    w.queue.read = read  # type: ignore[method-assign,assignment]
    w.queue.mark_alone = mark_alone  # type: ignore[method-assign,assignment]
    async with running(w):
        await eventually(lambda: _is(len(rec.calls) == 3 and rec.running == 0), timeout=30)
    assert rec.company["0"] == 1, rec.company


@pytest.mark.expect_loop_failures
async def test_an_orphan_that_ended_alone_is_not_blamed_when_its_completion_is_lost(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    publish: Any,
    rec: Recorder,
    make_worker: MakeWorker,
) -> None:
    """max_attempts 1. An orphan (delivery 2) runs alone and completes, but its completion
    cannot be recorded (Postgres refuses) before its worker dies. It did not take the
    worker down: the next takeover runs it again (idempotent), not dead-letters it."""

    await publish(1)
    await delivered_to(redis, "dead", 1)
    w1 = make_worker(visibility_timeout_seconds=0.3, max_attempts=1)
    w1.bookkeeping = StalledCompletions(pool, refuse=True)  # type: ignore[assignment]
    await w1.start()
    await eventually(lambda: _is(("0", 2) in rec.calls and rec.running == 0), timeout=5)
    await asyncio.sleep(0.1)  # its completion fails to be recorded
    await _die(w1)
    w2 = make_worker(consumer_name="w2", visibility_timeout_seconds=0.3, max_attempts=1)
    await w2.setup()
    await asyncio.sleep(0.4)
    while await w2.run_once():
        pass
    assert await dead_letters(redis) == []
    assert ("0", 3) in rec.calls


async def test_an_orphan_whose_claim_lapsed_is_not_marked_by_the_worker_that_lost_it(
    redis: aioredis.Redis, publish: Any
) -> None:
    """In an outage longer than the visibility timeout a held orphan's claim lapses and
    another worker takes it over: the worker that lost it must neither mark it (the other
    worker's takeover would then blame it) nor run it."""
    await publish(1)
    q = StreamQueue(redis, "default")
    await q.ensure_group()
    (entry,) = await q.read("w1", 1, None)
    client: Any = redis
    await client.xclaim(STREAM, CONSUMER_GROUP, "other", 0, [entry.id])
    assert await q.mark_alone("w1", entry.id, 1) is False
    assert await q.take_alone_mark(entry.id, 2) is False
    assert await q.mark_alone("other", entry.id, 2) is True
    assert await q.take_alone_mark(entry.id, 3) is True


async def test_a_stop_clears_the_mark_of_an_orphan_it_cut_short(
    redis: aioredis.Redis, publish: Any, rec: Recorder, make_worker: MakeWorker
) -> None:
    """An orphan running alone (marked at delivery 2) ignores its timeout, then a stop
    cuts it short and hands it back with that timed-out delivery counted (2), not run
    alone to an end: the mark must go, or a crash of another entry beside its next
    delivery would blame it."""
    await publish(1, task="stubborn")
    (orphan,) = await delivered_to(redis, "dead", 1)
    worker = make_worker(visibility_timeout_seconds=0.3)
    await worker.start()
    try:
        await eventually(lambda: _is(bool(worker._timed_out)), timeout=5)
        await worker.stop(grace=0.3)
    finally:
        rec.released = True
    owner = await _owner(redis, orphan.id)
    assert owner is not None
    assert owner[1] == 2  # its timeout had ended the attempt: counted
    client: Any = redis
    assert await client.exists(alone_key(orphan.id)) == 0


async def _cancelled_as_connection_error() -> None:
    """A step that turns its cancellation into another error, as redis-py can in the middle
    of a command."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        raise ConnectionError("Connection closed by server") from None


async def _cancelled_and_retried() -> None:
    """A step whose cancellation is swallowed and that returns, as when redis-py's retry
    runs the interrupted command again."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()


@pytest.mark.expect_loop_failures
@pytest.mark.parametrize("step", [_cancelled_as_connection_error, _cancelled_and_retried])
async def test_a_loop_cancelled_inside_a_command_that_hides_the_cancellation_ends(
    make_worker: MakeWorker, step: Callable[[], Awaitable[None]]
) -> None:
    """A cancelled supervised loop (a stop past its grace, asyncio.run() at exit, a test's
    simulated crash) ends even when what it awaited raised something else or returned:
    before, it went round again, and whoever awaited it hung."""
    worker = make_worker()
    task = asyncio.create_task(worker._supervise("fetch", step, asyncio.Event()))
    await asyncio.sleep(0.05)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done, "the loop went on after its cancellation"
    assert task.cancelled()
