"""The relay against real Postgres and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from devstack.postgres import PostgresServer, truncate_tables
from devstack.procs import free_port
from devstack.redis import RedisServer
from relay import publisher as publisher_mod
from relay.listener import Listener
from relay.maintenance import Maintenance, refresh_backlog_gauges
from relay.publisher import (
    _CLAIM,
    _MARK_PUBLISHED,
    PUBLISH_SCRIPT,
    ROW_COLUMNS,
    Publisher,
    RelayLoop,
    Row,
    Wakeups,
    to_row,
)
from relay.reconciler import Reconciler
from relay.retention import purge_completed
from relay.settings import RelaySettings
from shared.connections import REDIS_SOCKET_TIMEOUT_SECONDS, create_pool, create_redis
from shared.constants import dedupe_key, stream_key
from shared.envelope import Envelope
from shared.errors import ConfigError
from shared.migrate import (
    EQUIVALENT_EARLIER,
    MigrationChanged,
    checksum,
    discover,
    migrate,
    migrations_dir,
)
from shared.outbox import enqueue
from tests.helpers import eventually, relay_settings
from tests.test_autopipeline import silent_server
from worker_service.consumer import _MARK_COMPLETED


async def add_events(pool: asyncpg.Pool[Any], n: int, queue: str = "default") -> list[str]:
    ids = []
    async with pool.acquire() as conn, conn.transaction():
        for i in range(n):
            headers = {"request_id": f"req-{i}"}
            ids.append(str(await enqueue(conn, "t", {"i": i}, queue=queue, headers=headers)))
    return ids


async def stream_events(redis: aioredis.Redis, queue: str = "default") -> list[Envelope]:
    client: Any = redis
    entries = await client.xrange(stream_key(queue))
    return [Envelope.decode(fields) for _, fields in entries]


async def stream_ids(redis: aioredis.Redis, queue: str = "default") -> list[bytes]:
    client: Any = redis
    return [sid for sid, _ in await client.xrange(stream_key(queue))]


@pytest.fixture
def settings(pg_server: PostgresServer, redis_server: RedisServer) -> RelaySettings:
    return relay_settings(pg_server, redis_server, batch_size=100)


async def test_publishes_every_row_once_and_marks_it(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    ids = await add_events(pool, 250)
    relay = RelayLoop(pool, redis, settings)
    assert await relay.run_once() is True  # a full batch: more may wait
    assert await relay.run_once() is True
    assert await relay.run_once() is False  # 50 < 100
    assert await relay.run_once() is False  # nothing left
    events = await stream_events(redis)
    assert [e.event_id for e in events] == ids
    assert events[0].payload == {"i": 0}
    rows = await pool.fetch("SELECT published_at, stream_id FROM outbox")
    assert all(r["published_at"] is not None and r["stream_id"] for r in rows)


async def test_enqueue_takes_a_plain_asyncpg_connection(
    pool: asyncpg.Pool[Any], pg_server: PostgresServer
) -> None:
    """A producer's own connection, without create_pool()'s jsonb codec (it failed there:
    "expected str, got dict")."""
    conn = await asyncpg.connect(pg_server.dsn)
    try:
        async with conn.transaction():
            event_id = await enqueue(conn, "send_invoice", {"invoice_id": 7}, headers={"a": "b"})
    finally:
        await conn.close()
    row = await pool.fetchrow("SELECT payload, headers FROM outbox WHERE event_id = $1", event_id)
    assert row is not None
    assert (row["payload"], row["headers"]) == ({"invoice_id": 7}, {"a": "b"})


async def test_the_envelope_postgres_builds_decodes_like_the_python_one(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    """The relay publishes envelopes built in SQL (ENVELOPE_SQL); the worker decodes them
    with Envelope.decode, which must see exactly what Envelope.encode would have said."""
    payload = {"username": "zoë", "nested": {"list": [1, 2.5, None, True]}, "s": 'q"\\'}
    async with pool.acquire() as conn, conn.transaction():
        event_id = await enqueue(conn, "t", payload, headers={"request_id": "req-é"})
        # A timestamp with a time zone other than UTC and fewer than six fractional digits.
        await conn.execute(
            "UPDATE outbox SET created_at = '2026-03-01 12:34:56.5+05:30' WHERE event_id = $1",
            event_id,
        )
        rec = await conn.fetchrow("SELECT * FROM outbox WHERE event_id = $1", event_id)
    assert rec is not None
    expected = Envelope(
        event_id=str(event_id),
        type="t",
        payload=payload,
        created_at=rec["created_at"],
        headers={"request_id": "req-é"},
    )
    await RelayLoop(pool, redis, settings).run_once()
    (published,) = await stream_events(redis)
    assert published == expected
    assert published == Envelope.decode({b"e": expected.encode()})
    assert published.created_at == datetime(2026, 3, 1, 7, 4, 56, 500000, tzinfo=UTC)


async def test_envelope_bytes_do_not_depend_on_the_sessions_time_zone(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    """The relay's pool renders timestamps in UTC even when the connection asks for
    another TimeZone (as a role's or database's default would)."""
    await add_events(pool, 1)
    elsewhere = await create_pool(settings.database_url + "?options=-c%20TimeZone%3DAsia/Kolkata")
    try:
        await RelayLoop(elsewhere, redis, settings).run_once()
    finally:
        await elsewhere.close()
    client: Any = redis
    ((_, fields),) = await client.xrange(stream_key("default"))
    created_at = orjson.loads(fields[b"e"])["created_at"]
    assert created_at.endswith("+00:00"), created_at


async def test_crash_between_xadd_and_commit_does_not_publish_twice(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    await add_events(pool, 10)
    relay = RelayLoop(pool, redis, settings)
    # The XADDs happen, then the transaction dies before the rows are marked.
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        recs = await conn.fetch(f"SELECT {ROW_COLUMNS} FROM outbox FOR UPDATE")  # noqa: S608
        first_ids = await relay.publisher.publish([to_row(r) for r in recs])
        await tx.rollback()
    assert await redis.xlen(stream_key()) == 10
    await relay.run_once()  # the next relay takes the same rows
    assert await redis.xlen(stream_key()) == 10  # found by their dedupe keys
    marked = [r["stream_id"] for r in await pool.fetch("SELECT stream_id FROM outbox ORDER BY id")]
    assert marked == first_ids


async def test_two_relays_never_publish_a_row_twice(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    pg_server: PostgresServer,
    redis_server: RedisServer,
) -> None:
    ids = await add_events(pool, 2000)
    s = relay_settings(pg_server, redis_server, batch_size=50)
    a, b = RelayLoop(pool, redis, s), RelayLoop(pool, redis, s)
    # What each relay hands to Redis: the stream alone would not tell, since the dedupe
    # keys turn a second XADD of an event into a no-op.
    handed: dict[RelayLoop, list[str]] = {a: [], b: []}
    for relay in (a, b):
        publish = relay.publisher.publish

        async def recording(rows: list[Row], publish: Any = publish, relay: Any = relay) -> Any:
            handed[relay] += [r.event_id for r in rows]
            return await publish(rows)

        relay.publisher.publish = recording  # type: ignore[method-assign,assignment]

    async def drain(relay: RelayLoop) -> int:
        batches = 0
        while await relay.run_once():
            batches += 1
        return batches

    batches = await asyncio.gather(drain(a), drain(b))
    assert all(n > 0 for n in batches), "both relays should have shared the work"
    assert not set(handed[a]) & set(handed[b]), "a row went to both relays"
    assert sorted(handed[a] + handed[b]) == sorted(ids)
    events = await stream_events(redis)
    assert sorted(e.event_id for e in events) == sorted(ids)
    assert len({e.event_id for e in events}) == len(events)


async def test_row_committed_out_of_order_is_not_skipped(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    relay = RelayLoop(pool, redis, settings)
    async with pool.acquire() as slow:
        tx = slow.transaction()
        await tx.start()
        slow_id = await enqueue(slow, "t", {"slow": True})  # takes the lower id
        fast = await add_events(pool, 1)  # commits first with a higher id
        await relay.run_once()
        assert [e.event_id for e in await stream_events(redis)] == fast
        await tx.commit()
    await relay.run_once()
    published = [e.event_id for e in await stream_events(redis)]
    assert published == [*fast, str(slow_id)]


async def test_one_row_redis_refuses_does_not_block_the_rest(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    # A key of the wrong type where queue "broken" keeps its stream: XADD there fails.
    await redis.set(stream_key("broken"), "not a stream")
    good = await add_events(pool, 5)
    bad = await add_events(pool, 1, queue="broken")
    good += await add_events(pool, 5)
    relay = RelayLoop(pool, redis, settings)
    await relay.run_once()
    assert [e.event_id for e in await stream_events(redis)] == good
    row = await pool.fetchrow("SELECT * FROM outbox WHERE event_id = $1", uuid.UUID(bad[0]))
    assert row is not None
    assert row["published_at"] is None
    assert row["publish_attempts"] == 1
    assert "WRONGTYPE" in row["last_error"]
    assert row["available_at"] > row["created_at"]  # backed off, not retried in a hot loop
    # Once Redis takes it, it goes through.
    await redis.delete(stream_key("broken"))
    await pool.execute("UPDATE outbox SET available_at = now()")
    await relay.run_once()
    assert [e.event_id for e in await stream_events(redis, "broken")] == bad


async def test_a_row_redis_keeps_refusing_shows_in_the_backlog_age(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    """Each refusal moves the row's available_at on (up to 5 minutes), so its wait since
    it became due never passed the alert's 60 s: a row refused for hours went unseen. Its
    wait now counts from its creation, until it is published."""
    await redis.set(stream_key("broken"), "not a stream")
    (bad,) = await add_events(pool, 1, queue="broken")
    await pool.execute("UPDATE outbox SET created_at = now() - interval '2 hours'")
    relay = RelayLoop(pool, redis, settings)
    for _ in range(3):
        await pool.execute("UPDATE outbox SET available_at = now() - interval '0.5 s'")
        await relay.run_once()  # refused again, and backed off
        backlog, oldest = await refresh_backlog_gauges(pool)
        assert backlog == 1
        assert oldest > 7000, oldest
    await redis.delete(stream_key("broken"))
    await pool.execute("UPDATE outbox SET available_at = now()")
    await relay.run_once()
    assert [e.event_id for e in await stream_events(redis, "broken")] == [bad]
    assert await refresh_backlog_gauges(pool) == (0, 0.0)


async def test_redis_refusing_every_write_backs_off_the_loop_not_each_row(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    """Memory full under noeviction (as READONLY after a failover, an ACL, MISCONF): no row
    is at fault, so none is marked failed or pushed back by its own backoff; the batch
    rolls back and the loop's error backoff takes over, and all go once Redis takes them."""
    ids = await add_events(pool, 5)
    relay = RelayLoop(pool, redis, settings)
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", "1")
    try:
        with pytest.raises(ResponseError):
            await relay.run_once()
    finally:
        await redis.config_set("maxmemory", "0")
    rows = await pool.fetch("SELECT publish_attempts, published_at, last_error FROM outbox")
    assert [(r["publish_attempts"], r["published_at"], r["last_error"]) for r in rows] == [
        (0, None, None)
    ] * 5
    await relay.run_once()
    assert [e.event_id for e in await stream_events(redis)] == ids


async def test_redis_refusing_every_write_in_the_middle_of_a_row_by_row_pass(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    """One row refused (its dedupe key of the wrong type) sends the batch row by row; if
    Redis then refuses every write (memory full), the rest are not each marked failed and
    backed off: the batch rolls back, and all go once Redis takes writes again (found by a
    mutation review)."""
    (bad,) = await add_events(pool, 1)
    await redis.hset(dedupe_key(bad, "default"), "not", "a string")
    good = await add_events(pool, 4)
    relay = RelayLoop(pool, redis, settings)
    publish = relay.publisher.publish
    calls = 0

    async def then_memory_full(rows: list[Row], **kw: Any) -> list[str]:
        nonlocal calls
        calls += 1
        try:
            return await publish(rows, **kw)
        finally:
            if calls == 2:  # the first row by itself, refused
                await redis.config_set("maxmemory-policy", "noeviction")
                await redis.config_set("maxmemory", "1")

    relay.publisher.publish = then_memory_full  # type: ignore[method-assign]
    try:
        with pytest.raises(ResponseError, match=r"OOM|maxmemory"):  # Redis 6's text, 7's
            await relay.run_once()
    finally:
        await redis.config_set("maxmemory", "0")
    assert calls == 3  # the batch, the refused row, and the next, refused with OOM
    rows = await pool.fetch("SELECT publish_attempts, published_at, last_error FROM outbox")
    assert [(r["publish_attempts"], r["published_at"], r["last_error"]) for r in rows] == [
        (0, None, None)
    ] * 5
    await redis.delete(dedupe_key(bad, "default"))
    await relay.run_once()
    assert [e.event_id for e in await stream_events(redis)] == [bad, *good]


async def test_notify_wakes_the_relay_without_waiting_for_the_poll(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    pg_server: PostgresServer,
    redis_server: RedisServer,
) -> None:
    s = relay_settings(pg_server, redis_server, poll_interval_seconds=300)
    relay = RelayLoop(pool, redis, s)
    listener = Listener(pg_server.dsn, relay.wake)
    await listener.start()
    await relay.start()
    try:
        await eventually(lambda: _true(listener.connected))
        ids = await add_events(pool, 3)

        async def published() -> bool:
            return await redis.xlen(stream_key()) == 3

        await eventually(published, timeout=5)
        assert [e.event_id for e in await stream_events(redis)] == ids
    finally:
        await relay.stop()
        await listener.stop()
        await listener.stop()  # stop is idempotent


async def _true(value: bool) -> bool:
    return value


async def test_a_listener_whose_server_stops_answering_reconnects(
    pg_server: PostgresServer,
) -> None:
    """A LISTEN connection to a server that went silent (here its backend is SIGSTOPped, as
    a peer behind a partition) looks open for ever: the ping notices and reconnects."""
    wakes: list[float] = []
    listener = Listener(
        pg_server.dsn, lambda: wakes.append(time.monotonic()), ping_every=0.1, ping_timeout=0.5
    )
    listener.idle_interval = 0.05
    await listener.start()
    try:
        await eventually(lambda: _true(listener.connected))
        conn = listener._conn
        assert conn is not None
        backend = conn.get_server_pid()
        os.kill(backend, signal.SIGSTOP)
        try:
            await eventually(lambda: _true(listener._conn is not conn and listener.connected))
        finally:
            os.kill(backend, signal.SIGCONT)
        assert listener._conn is not None
        assert listener._conn.get_server_pid() != backend
        assert len(wakes) == 2  # woken again after the reconnect, to catch up
    finally:
        await listener.stop()


async def test_stop_before_start_is_safe(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    relay = RelayLoop(pool, redis, settings)
    await relay.stop()
    await relay.stop()


async def test_a_redis_that_stops_answering_fails_the_batch_and_frees_its_rows(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    """A Redis that accepts and never answers (a partition without a reset, a stuck
    fsync): the relay's call times out, its claim transaction rolls back, and another relay
    publishes the rows, instead of the first holding them locked until TCP gives up."""
    assert redis.connection_pool.connection_kwargs.get("socket_timeout") == (
        REDIS_SOCKET_TIMEOUT_SECONDS
    )
    await add_events(pool, 5)
    async with silent_server(socket_timeout=0.5) as (silent, _):
        stuck = RelayLoop(pool, silent, settings)
        with pytest.raises(RedisTimeoutError):
            await asyncio.wait_for(stuck.run_once(), 10)
        await RelayLoop(pool, redis, settings).run_once()
    assert await redis.xlen(stream_key()) == 5


@pytest.mark.expect_loop_failures
async def test_redis_down_backs_off_and_loses_nothing(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    redis_server: RedisServer,
    settings: RelaySettings,
) -> None:
    ids = await add_events(pool, 20)
    relay = RelayLoop(pool, redis, settings)
    redis_server.stop()
    try:
        with pytest.raises(RedisConnectionError):
            await relay.run_once()
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 20
        # The loop keeps going with backoff instead of dying.
        await relay.start()
        await eventually(lambda: _true(relay.failures >= 2), timeout=10)
        assert relay.running
    finally:
        redis_server.start()
    await eventually(lambda: _count_unpublished_is(pool, 0), timeout=15)
    await relay.stop()
    fresh = aioredis.Redis.from_url(redis_server.url)
    assert [e.event_id for e in await stream_events(fresh)] == ids
    await fresh.aclose()


async def _count_unpublished_is(pool: asyncpg.Pool[Any], n: int) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == n)


async def test_an_outbox_row_takes_only_json_objects_as_payload_and_headers(
    pool: asyncpg.Pool[Any],
) -> None:
    """A worker decodes only objects: enqueue() refuses anything else, and so does the
    table, for writers that insert rows themselves."""
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(TypeError):
            await enqueue(conn, "t", [1])  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await enqueue(conn, "t", {}, headers="x")  # type: ignore[arg-type]
    for payload, headers in (("[1]", "{}"), ('"text"', "{}"), ("{}", "[]")):
        with pytest.raises(asyncpg.CheckViolationError):
            await pool.execute(
                "INSERT INTO outbox (event_id, task_type, payload, headers)"
                " VALUES (gen_random_uuid(), 't', $1::jsonb, $2::jsonb)",
                payload,
                headers,
            )
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0


async def test_reconciler_goes_round_again_and_leaves_recent_events_alone(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    """After a short page the check starts again from the oldest, so an event lost behind
    where the last pass stood is found on the next; one published more recently than
    `after_seconds` is not checked yet, lost or not (found by a second mutation review)."""
    ids = await add_events(pool, 6)
    relay = RelayLoop(pool, redis, settings)
    await relay.run_once()
    await pool.execute("UPDATE outbox SET published_at = now() - interval '2 hours'")
    recent = ids[5]
    await pool.execute(
        "UPDATE outbox SET published_at = now() - interval '30 minutes' WHERE event_id = $1",
        uuid.UUID(recent),
    )
    reconciler = Reconciler(pool, redis, relay.publisher, after_seconds=3600, page_size=2)
    assert [await reconciler.run_once() for _ in range(3)] == [0, 0, 0]  # 2 + 2 + 1: round
    entries = {
        e.event_id: sid
        for sid, e in zip(await stream_ids(redis), await stream_events(redis), strict=True)
    }
    await redis.xdel(stream_key(), entries[ids[0]], entries[recent])  # the first, and the recent
    assert await reconciler.run_once() == 1  # the first page again
    assert [e.event_id for e in await stream_events(redis)][-1] == ids[0]
    assert [await reconciler.run_once() for _ in range(3)] == [0, 0, 0]
    assert recent not in [e.event_id for e in await stream_events(redis)]


async def test_reconciler_republishes_events_redis_lost(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    settings: RelaySettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ids = await add_events(pool, 30)
    relay = RelayLoop(pool, redis, settings)
    await relay.run_once()
    # 10 completed, 20 still in flight; then Redis loses everything.
    await pool.execute(
        "UPDATE outbox SET completed_at = now() WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 10)"
    )
    await redis.flushall()
    reconciler = Reconciler(pool, redis, relay.publisher, after_seconds=0.0, page_size=7)
    total = 0
    for _ in range(5):
        total += await reconciler.run_once()
    assert total == 20
    logged = [r for r in caplog.records if r.getMessage() == "event_republished"]
    assert len(logged) == 20
    assert {getattr(r, "request_id", None) for r in logged} == {f"req-{i}" for i in range(10, 30)}
    republished = [e.event_id for e in await stream_events(redis)]
    assert sorted(republished) == sorted(ids[10:])
    # Present now: another pass publishes nothing more.
    for _ in range(5):
        assert await reconciler.run_once() == 0
    assert await redis.xlen(stream_key()) == 20
    # The dedupe keys point at the new entries.
    sid = await redis.get(dedupe_key(ids[10]))
    assert sid is not None


async def test_maintenance_works_through_lost_events_page_after_page_without_waiting(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    """After Redis lost its data, a pass that republished a full page runs again at once
    (a page per maintenance interval would take hours over a large backlog in flight);
    once a pass finds nothing lost, the loop goes back to its interval."""
    ids = await add_events(pool, 30)
    relay = RelayLoop(pool, redis, settings)
    await relay.run_once()
    await redis.flushall()
    reconciler = Reconciler(pool, redis, relay.publisher, after_seconds=0.0, page_size=7)
    maintenance = Maintenance(pool, reconciler, settings)
    passes = [await maintenance.run_once()]
    while passes[-1] and len(passes) < 10:
        passes.append(await maintenance.run_once())
    # Pages of 7 lost events, then (after_seconds=0 here makes the republished rows
    # candidates again) a last page with the 2 left, and a full page with nothing lost.
    assert passes[:4] == [True] * 4 and passes[-1] is False, passes
    assert sorted(e.event_id for e in await stream_events(redis)) == sorted(ids)


async def test_reconciler_leaves_young_and_finished_events_alone(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    await add_events(pool, 5)
    relay = RelayLoop(pool, redis, settings)
    await relay.run_once()
    await redis.flushall()
    reconciler = Reconciler(pool, redis, relay.publisher, after_seconds=3600)
    assert await reconciler.run_once() == 0
    await pool.execute("UPDATE outbox SET dead_lettered_at = now()")
    reconciler.after_seconds = 0
    assert await reconciler.run_once() == 0


async def test_a_republish_whose_new_id_never_reached_postgres_is_not_added_again(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    """The relay dies (or its commit, or Redis's reply, is lost) after the republish's XADD
    and before Postgres records the new id: the next check finds the old id missing again,
    and must take the entry the first republish added, not add a second one."""
    ids = await add_events(pool, 3)
    relay = RelayLoop(pool, redis, settings)
    await relay.run_once()
    await redis.flushall()

    class DiesAfterPublishing:
        async def publish(self, rows: list[Row], *, republish: bool = False) -> list[str]:
            await relay.publisher.publish(rows, republish=republish)
            raise ConnectionError("the relay's connection to Postgres drops")

    dying = Reconciler(pool, redis, DiesAfterPublishing(), after_seconds=0.0)  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        await dying.run_once()
    first = await stream_ids(redis)
    assert len(first) == 3
    assert await Reconciler(pool, redis, relay.publisher, after_seconds=0.0).run_once() == 3
    assert await stream_ids(redis) == first
    marked = await pool.fetch("SELECT stream_id FROM outbox ORDER BY id")
    assert [r["stream_id"].encode() for r in marked] == first
    assert sorted(e.event_id for e in await stream_events(redis)) == sorted(ids)


async def test_a_queue_whose_stream_redis_refuses_to_read_holds_back_only_its_rows(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    """Redis lost its data, and one queue's stream key now refuses XRANGE (here it holds
    a string: WRONGTYPE; in life an ACL's NOPERM). The other queue's lost events are
    still published again; the refused queue's wait for the refusal to end."""
    await add_events(pool, 3, queue="a")
    await add_events(pool, 3, queue="b")
    relay = RelayLoop(pool, redis, settings)
    await relay.run_once()
    await redis.flushall()
    await redis.set(stream_key("b"), "not a stream")
    reconciler = Reconciler(pool, redis, relay.publisher, after_seconds=0.0)
    assert await reconciler.run_once() == 3
    assert await redis.xlen(stream_key("a")) == 3
    await redis.delete(stream_key("b"))  # the refusal ends
    assert await reconciler.run_once() == 3
    assert await redis.xlen(stream_key("b")) == 3


async def test_a_republish_redis_refuses_in_part_adds_nothing_twice_on_the_next_passes(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    """One queue's stream refuses the XADD (here its last id is the highest there is; in
    life an ACL, or memory filling between two chunks): the reconciler's transaction rolls
    back after the other queue's chunk went in, and every pass until the refusal ends must
    find that chunk's entries rather than add them again."""
    await add_events(pool, 3, queue="a")
    await add_events(pool, 3, queue="b")
    relay = RelayLoop(pool, redis, settings)
    await relay.run_once()
    await redis.flushall()
    await redis.xadd(stream_key("b"), {"x": "y"}, id="1-1")
    await redis.xdel(stream_key("b"), "1-1")
    await redis.execute_command(  # type: ignore[no-untyped-call]
        "XSETID", stream_key("b"), "18446744073709551615-18446744073709551615"
    )
    reconciler = Reconciler(pool, redis, relay.publisher, after_seconds=0.0)
    for _ in range(4):
        with pytest.raises(ResponseError):
            await reconciler.run_once()
    assert await redis.xlen(stream_key("a")) == 3
    await redis.delete(stream_key("b"))  # the refusal ends
    assert await reconciler.run_once() == 6
    assert await redis.xlen(stream_key("a")) == 3
    assert await redis.xlen(stream_key("b")) == 3


async def test_an_unpublished_row_already_given_up_on_is_neither_published_nor_counted(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    """Migration 002 gives up on unfinished rows whose payload is not a JSON object,
    unpublished ones included (kept for an operator): the relay must not publish them to
    a worker that would dead-letter them again, nor count them as a backlog for ever (the
    oldest-unpublished alert would never clear)."""
    given_up, due = await add_events(pool, 2)
    await pool.execute(
        "UPDATE outbox SET dead_lettered_at = now(), last_error = 'not an object'"
        " WHERE event_id = $1",
        given_up,
    )
    relay = RelayLoop(pool, redis, settings)
    while await relay.run_once():
        pass
    assert [e.event_id for e in await stream_events(redis)] == [due]
    assert (
        await pool.fetchval("SELECT published_at FROM outbox WHERE event_id = $1", given_up) is None
    )
    assert await refresh_backlog_gauges(pool) == (0, 0.0)


async def test_retention_purges_only_old_completed_rows(pool: asyncpg.Pool[Any]) -> None:
    """Rows completed more than the window ago go; those completed within it, unpublished,
    in flight or dead-lettered long ago (kept for `outboxctl dead restore-lost`) stay."""
    await add_events(pool, 40)
    old = datetime.now(UTC) - timedelta(days=2)
    await pool.execute("UPDATE outbox SET published_at = $1, completed_at = $1 WHERE id <= 20", old)
    await pool.execute("UPDATE outbox SET published_at = now() WHERE id > 25 AND id <= 30")
    await pool.execute(
        "UPDATE outbox SET published_at = now(), completed_at = now() - interval '1 hour'"
        " WHERE id > 30 AND id <= 35"
    )
    await pool.execute(
        "UPDATE outbox SET published_at = $1, dead_lettered_at = $1 WHERE id > 35", old
    )
    assert await purge_completed(pool, 86_400, batch=7) == 20
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 20
    assert await pool.fetchval("SELECT min(id) FROM outbox") == 21


async def test_maintenance_runs_again_at_once_while_the_purge_is_behind(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    pg_server: PostgresServer,
    redis_server: RedisServer,
) -> None:
    """A pass deletes at most purge_batch x purge_max_batches rows: with more expired than
    that, it asks to run again at once instead of after the interval (which capped the
    purge at 2,000 rows a second per relay, below the rate the relay publishes)."""
    await add_events(pool, 25)
    await pool.execute(
        "UPDATE outbox SET published_at = now(), completed_at = now() - interval '2 days'"
    )
    settings = relay_settings(pg_server, redis_server)
    publisher = Publisher(redis, settings.dedupe_ttl_seconds)
    reconciler = Reconciler(pool, redis, publisher, after_seconds=60)
    maintenance = Maintenance(pool, reconciler, settings)
    maintenance.purge_batch, maintenance.purge_max_batches = 5, 2
    passes = [await maintenance.run_once() for _ in range(3)]
    assert passes == [True, True, False]  # 10, 10, then the last 5
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0


async def test_maintenance_purges_and_counts_while_the_reconciler_fails(
    pool: asyncpg.Pool[Any], pg_server: PostgresServer, redis_server: RedisServer
) -> None:
    """Redis down: the reconciler's step fails, the Postgres-only steps still run."""
    await add_events(pool, 3)
    await pool.execute(
        "UPDATE outbox SET published_at = now(), completed_at = now() - interval '2 days'"
        " WHERE id = 1"
    )
    await pool.execute("UPDATE outbox SET published_at = now() - interval '1 hour' WHERE id = 2")
    dead_redis = create_redis(f"redis://127.0.0.1:{free_port()}/0")
    settings = relay_settings(pg_server, redis_server)
    reconciler = Reconciler(
        pool, dead_redis, Publisher(dead_redis, settings.dedupe_ttl_seconds), after_seconds=60
    )
    with pytest.raises(RedisConnectionError):
        await Maintenance(pool, reconciler, settings).run_once()
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 2  # purged anyway
    assert REGISTRY.get_sample_value("relay_outbox_backlog") == 1  # counted anyway
    await dead_redis.aclose()


async def test_migration_002_repairs_rows_that_are_not_json_objects(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """Rows written before the outbox refused them: the migration gives up on the
    unfinished one (its payload kept for an operator) instead of failing the deploy."""
    dsn = pg_server.create_database("migrate_002")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        first = tmp_path / "only_001"
        first.mkdir()
        (first / "001_init.sql").write_text((migrations_dir() / "001_init.sql").read_text())
        assert await migrate(dsn, first) == [1]
        await conn.execute(
            "INSERT INTO outbox (event_id, task_type, payload, headers, completed_at) VALUES"
            " (gen_random_uuid(), 't', '[1]', '{}', NULL),"
            " (gen_random_uuid(), 't', '{\"ok\": 1}', '\"x\"', now()),"
            " (gen_random_uuid(), 't', '{\"ok\": 2}', '{}', NULL)"
        )
        assert await migrate(dsn) == [v for v, _ in discover(migrations_dir()) if v > 1]
        rows = await conn.fetch(
            "SELECT payload::text, headers::text, dead_lettered_at IS NOT NULL AS dead,"
            " last_error FROM outbox ORDER BY id"
        )
        assert [(r["payload"], r["headers"], r["dead"]) for r in rows] == [
            ('{"invalid": [1]}', "{}", True),
            ('{"ok": 1}', "{}", False),  # finished: only repaired
            ('{"ok": 2}', "{}", False),  # untouched
        ]
        assert rows[0]["last_error"].startswith("undecodable: ")
        valid = await conn.fetchval(
            "SELECT bool_and(convalidated) FROM pg_constraint WHERE conname LIKE 'outbox_%_is_object'"
        )
        assert valid is True
    finally:
        await conn.close()


async def test_a_migration_waiting_for_a_lock_lets_writes_pass_and_tries_again(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """A long transaction holds the table (a worker's send, say): the ALTER gives up its
    place in the lock queue after lock_timeout, so the writes behind it go on, and it tries
    again until the lock is free."""
    dsn = pg_server.create_database("migrate_lock")
    admin = await asyncpg.connect(dsn)
    holder = await asyncpg.connect(dsn)
    writer = await asyncpg.connect(dsn)
    try:
        await admin.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await admin.execute("CREATE TABLE t (id int)")
        (tmp_path / "001_alter.sql").write_text("ALTER TABLE t ADD COLUMN x int;")
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT * FROM t")  # an ACCESS SHARE lock, held
        migrating = asyncio.ensure_future(
            migrate(dsn, tmp_path, lock_timeout_ms=200, lock_attempts=50)
        )
        await asyncio.sleep(0.5)
        # Between the ALTER's attempts an INSERT goes through (queued behind an ALTER
        # that waits for ever, it would wait as long as the holder: past this bound).
        await asyncio.wait_for(writer.execute("INSERT INTO t (id) VALUES (1)"), 5)
        assert not migrating.done()
        await tx.commit()
        assert await asyncio.wait_for(migrating, 10) == [1]
        assert (
            await admin.fetchval(
                "SELECT count(*) FROM information_schema.columns"
                " WHERE table_name = 't' AND column_name = 'x'"
            )
            == 1
        )
    finally:
        for conn in (admin, holder, writer):
            await conn.close()


async def _tables(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r["tablename"] for r in rows}
    finally:
        await conn.close()


async def test_a_migration_changed_after_it_was_applied_stops_the_run(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """Before anything is applied, and with the file named; restoring it lets the run go on.
    Line endings do not count, and versions applied before checksums were kept get theirs."""
    dsn = pg_server.create_database(f"migrate_sum_{uuid.uuid4().hex[:8]}")
    first = tmp_path / "001_a.sql"
    first.write_text("CREATE TABLE a (id int);\n")
    assert await migrate(dsn, tmp_path) == [1]
    first.write_text("CREATE TABLE a (id int, x int);\n")
    (tmp_path / "002_b.sql").write_text("CREATE TABLE b (id int);\n")
    with pytest.raises(MigrationChanged, match=r"001_a\.sql was changed after it was applied"):
        await migrate(dsn, tmp_path)
    assert "b" not in await _tables(dsn)
    first.write_bytes(b"CREATE TABLE a (id int);\r\n")  # the same, checked out on Windows
    assert await migrate(dsn, tmp_path) == [2]
    assert {"a", "b"} <= await _tables(dsn)
    # A database migrated before checksums: the files as they are now are taken as applied.
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE schema_migrations SET checksum = NULL")
        assert await migrate(dsn, tmp_path) == []
        assert await conn.fetchval("SELECT count(checksum) FROM schema_migrations") == 2
    finally:
        await conn.close()
    (tmp_path / "002_b.sql").write_text("CREATE TABLE b (id bigint);\n")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE schema_migrations SET checksum = NULL WHERE version = 1")
        with pytest.raises(MigrationChanged, match=r"002_b\.sql"):
            await migrate(dsn, tmp_path)
        # A stopped run writes nothing, not even the checksum it would have filled in.
        assert (
            await conn.fetchval("SELECT checksum FROM schema_migrations WHERE version = 1") is None
        )
    finally:
        await conn.close()
    # Every applied file is checked, not only the last one.
    (tmp_path / "002_b.sql").write_text("CREATE TABLE b (id int);\n")
    assert await migrate(dsn, tmp_path) == []
    first.write_text("CREATE TABLE a (id smallint);\n")
    with pytest.raises(MigrationChanged, match=r"001_a\.sql was changed"):
        await migrate(dsn, tmp_path)


# 005 as it was released (until 1d6d099), before IF NOT EXISTS.
RELEASED_005 = (
    "-- Rows the relay failed to publish (Redis refused them, or was down), not yet published:\n"
    "-- each failure moves available_at on, so the backlog's age counts these from created_at\n"
    "-- (relay/maintenance.py), and this index keeps that lookup small. A row leaves it when it\n"
    "-- is published (last_error is cleared then).\n"
    "CREATE INDEX outbox_refused_idx ON outbox (created_at)\n"
    "    WHERE published_at IS NULL AND last_error IS NOT NULL;\n"
)


async def test_an_index_built_by_hand_before_the_upgrade_is_kept_by_its_migration(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """README (Development): build an index on a large table by hand, concurrently, before
    the release. 005 was a plain CREATE INDEX, which then failed on every run and kept the
    API unready; it now says IF NOT EXISTS, and rebuilds an invalid index of its name (a
    concurrent build that failed leaves one). A database that applied its earlier text is
    up to date and keeps that checksum (the release before checks it against its file);
    an earlier checksum does not excuse a file changed again."""
    upto4 = tmp_path / "upto4"
    upto4.mkdir()
    for version, path in discover(migrations_dir()):
        if version <= 4:
            (upto4 / path.name).write_text(path.read_text())
    refused_idx = (
        " outbox_refused_idx ON outbox (created_at)"
        " WHERE published_at IS NULL AND last_error IS NOT NULL"
    )
    index = (
        "SELECT i.indexrelid::int AS oid, i.indisvalid AS valid, i.indisunique AS is_unique"
        " FROM pg_index i WHERE i.indexrelid = to_regclass('outbox_refused_idx')"
    )
    for case in ("valid", "invalid"):
        dsn = pg_server.create_database(f"migrate_idx_{case}_{uuid.uuid4().hex[:8]}")
        assert await migrate(dsn, upto4) == [1, 2, 3, 4]
        conn = await asyncpg.connect(dsn)
        try:
            if case == "valid":
                await conn.execute("CREATE INDEX CONCURRENTLY" + refused_idx)
            else:  # a build that failed: two rows break the uniqueness it asked for
                for _ in range(2):
                    await conn.execute(
                        "INSERT INTO outbox"
                        " (event_id, queue, task_type, payload, created_at, last_error)"
                        " VALUES (gen_random_uuid(), 'default', 't', '{}', '2026-01-01',"
                        " 'refused')"
                    )
                with pytest.raises(asyncpg.UniqueViolationError):
                    await conn.execute("CREATE UNIQUE INDEX CONCURRENTLY" + refused_idx)
            before = await conn.fetchrow(index)
            assert before is not None and before["valid"] == (case == "valid")
            assert await migrate(dsn) == [5]
            after = await conn.fetchrow(index)
            assert after is not None and after["valid"] and not after["is_unique"]
            assert (after["oid"] == before["oid"]) == (case == "valid")  # kept, or rebuilt
        finally:
            await conn.close()

    name = "005_outbox_refused_idx.sql"
    current, (earlier, interim) = EQUIVALENT_EARLIER[name]
    assert checksum(migrations_dir() / name) == current
    conn = await asyncpg.connect(dsn)
    try:
        # Recorded as the released text's, which the release before checks against its file.
        recorded = "SELECT checksum FROM schema_migrations WHERE version = 5"
        assert await conn.fetchval(recorded) == earlier
        old = tmp_path / "release_before"
        old.mkdir()
        for _version, path in discover(migrations_dir()):
            (old / path.name).write_text(path.read_text())
        (old / name).write_text(RELEASED_005)
        assert checksum(old / name) == earlier
        assert await migrate(dsn, old) == []  # a rollback's migrate still runs
        assert await migrate(dsn) == []
        # A database migrated by the commits whose 005 recorded its own checksum.
        await conn.execute("UPDATE schema_migrations SET checksum = $1 WHERE version = 5", interim)
        assert await migrate(dsn) == []
    finally:
        await conn.close()
    changed = tmp_path / "changed"
    changed.mkdir()
    for _version, path in discover(migrations_dir()):
        (changed / path.name).write_text(path.read_text())
    (changed / name).write_text((changed / name).read_text() + "-- changed again\n")
    with pytest.raises(MigrationChanged, match=name):
        await migrate(dsn, changed)


async def test_two_migrate_runs_at_once_apply_each_migration_once(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """Every replica's start (or two deploys) may run migrate: the advisory lock makes the
    second wait for the first, then find nothing left to do."""
    dsn = pg_server.create_database(f"migrate_twice_{uuid.uuid4().hex[:8]}")
    (tmp_path / "001_slow.sql").write_text("SELECT pg_sleep(0.5);\nCREATE TABLE slow (id int);\n")
    runs = await asyncio.gather(migrate(dsn, tmp_path), migrate(dsn, tmp_path))
    assert sorted(runs) == [[], [1]]


async def test_migrate_waits_on_a_reader_of_schema_migrations_only_to_add_its_column(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """A session reading schema_migrations in a transaction (the API's /readyz reads it; a
    backup, an open psql) holds no run up that has nothing to apply; the one run that adds
    the checksum column waits for its lock as a migration does, at most lock_timeout at a
    time."""
    dsn = pg_server.create_database(f"migrate_rd_{uuid.uuid4().hex[:8]}")
    (tmp_path / "001_a.sql").write_text("CREATE TABLE a (id int);\n")
    assert await migrate(dsn, tmp_path) == [1]
    holder = await asyncpg.connect(dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("LOCK TABLE schema_migrations IN ACCESS SHARE MODE")  # as a SELECT
        assert await asyncio.wait_for(migrate(dsn, tmp_path), 5) == []
        await tx.rollback()
        await holder.execute("ALTER TABLE schema_migrations DROP COLUMN checksum")
        tx = holder.transaction()
        await tx.start()
        await holder.execute("LOCK TABLE schema_migrations IN ACCESS SHARE MODE")
        with pytest.raises(asyncpg.LockNotAvailableError):
            await asyncio.wait_for(migrate(dsn, tmp_path, lock_timeout_ms=100, lock_attempts=2), 5)
        # With the default timeouts, a reader that comes while the ALTER waits (the API's
        # /readyz gives its query 2 s) gets through within the column's shorter wait.
        migrating = asyncio.ensure_future(migrate(dsn, tmp_path))
        await asyncio.sleep(0.1)
        reader = await asyncpg.connect(dsn)
        try:
            started = time.monotonic()
            await asyncio.wait_for(reader.fetchval("SELECT count(*) FROM schema_migrations"), 2)
            assert time.monotonic() - started < 1.0
        finally:
            await reader.close()
        assert not migrating.done()
        await tx.rollback()
        assert await asyncio.wait_for(migrating, 10) == []
        assert await holder.fetchval("SELECT count(checksum) FROM schema_migrations") == 1
    finally:
        await holder.close()


def test_a_changed_migration_is_a_deployment_error_of_the_command(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    dsn = pg_server.create_database(f"migrate_cmd_{uuid.uuid4().hex[:8]}")
    (tmp_path / "001_a.sql").write_text("CREATE TABLE a (id int);\n")
    env = {**os.environ, "DATABASE_URL": dsn, "MIGRATIONS_DIR": str(tmp_path)}
    run = [sys.executable, "-m", "shared.migrate"]
    assert (
        subprocess.run(run, env=env, capture_output=True, timeout=60, check=False).returncode == 0
    )
    (tmp_path / "001_a.sql").write_text("DROP TABLE a;\n")
    out = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, out.stderr
    assert "001_a.sql was changed after it was applied" in out.stderr
    assert "Traceback" not in out.stderr


def test_migrations_run_in_version_order_and_none_may_be_missing(tmp_path: Path) -> None:
    for v in range(1, 1001):  # 1000_x.sql sorts before 999_x.sql as text
        (tmp_path / f"{v:03d}_m.sql").write_text("SELECT 1;")
    assert [v for v, _ in discover(tmp_path)] == list(range(1, 1001))
    (tmp_path / "004_m.sql").unlink()  # /readyz would never see the schema complete
    with pytest.raises(ConfigError, match="004 is missing"):
        discover(tmp_path)


async def test_backlog_gauges(pool: asyncpg.Pool[Any]) -> None:
    assert await refresh_backlog_gauges(pool) == (0, 0.0)
    await add_events(pool, 4)
    await pool.execute("UPDATE outbox SET available_at = now() - interval '90 seconds'")
    backlog, oldest = await refresh_backlog_gauges(pool)
    assert backlog == 4
    assert 89 < oldest < 120


def _calls(stats: dict[str, Any], prefix: str) -> int:
    # Redis 6 counts `cmdstat_script`, Redis 7 `cmdstat_script|load` and so on.
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith(prefix))


async def test_a_batch_is_one_evalsha_and_a_script_flush_is_survived(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, settings: RelaySettings
) -> None:
    await add_events(pool, 30)
    relay = RelayLoop(pool, redis, settings)
    await redis.script_flush()  # as after a Redis restart: the script is unknown
    before = await redis.info("commandstats")
    assert await relay.run_once() is False
    await add_events(pool, 30)
    assert await relay.run_once() is False
    after = await redis.info("commandstats")
    assert await redis.xlen(stream_key()) == 60
    # One SCRIPT LOAD after the NOSCRIPT, none per batch (no SCRIPT EXISTS round trip).
    assert _calls(after, "cmdstat_script") - _calls(before, "cmdstat_script") == 1
    assert _calls(after, "cmdstat_evalsha") - _calls(before, "cmdstat_evalsha") == 3


async def test_a_notify_wakes_one_idle_loop_and_a_full_batch_calls_for_help(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    pg_server: PostgresServer,
    redis_server: RedisServer,
) -> None:
    """One claim per commit at low rates; every loop at work on a backlog."""
    s = relay_settings(pg_server, redis_server, batch_size=100, poll_interval_seconds=300)
    loops = [RelayLoop(pool, redis, s, name=f"relay-{i}") for i in range(3)]
    wakeups = Wakeups(loops)
    for loop in loops:
        await loop.start()
    try:
        await asyncio.sleep(0.05)  # all three wait for a wake-up (the poll is far away)
        claims: list[str] = []
        original = RelayLoop.run_once

        async def counted(self: RelayLoop) -> bool:
            claims.append(self.name)
            return await original(self)

        RelayLoop.run_once = counted  # type: ignore[method-assign]
        try:
            await add_events(pool, 1)
            wakeups.notify()
            await eventually(lambda: _xlen_is(redis, 1))
            await asyncio.sleep(0.05)
            assert len(claims) == 1  # not one claim per loop
            claims.clear()
            await add_events(pool, 450)  # four full batches of 100, then 50
            wakeups.notify()
            await eventually(lambda: _xlen_is(redis, 451))
            assert len(set(claims)) >= 2  # the first loop's full batch brought in others
        finally:
            RelayLoop.run_once = original  # type: ignore[method-assign]
    finally:
        for loop in loops:
            await loop.stop()
    assert len({e.event_id for e in await stream_events(redis)}) == 451  # none twice


async def _xlen_is(redis: aioredis.Redis, n: int) -> bool:
    return int(await redis.xlen(stream_key())) == n


async def test_a_notify_while_every_loop_is_busy_is_taken_by_the_first_to_finish(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    pg_server: PostgresServer,
    redis_server: RedisServer,
) -> None:
    """No wake-up may wait for the poll: not even when the loop it would go to is slow."""
    s = relay_settings(pg_server, redis_server, poll_interval_seconds=300)
    loops = [RelayLoop(pool, redis, s, name=f"relay-{i}") for i in range(2)]
    wakeups = Wakeups(loops)
    gates = {loop.name: asyncio.Event() for loop in loops}
    inside: set[str] = set()
    original = RelayLoop._run_batch

    async def slow_batch(self: RelayLoop) -> bool:
        full = await original(self)
        if not gates[self.name].is_set():  # a batch that is slow to end, after its claim
            inside.add(self.name)
            await gates[self.name].wait()
        return full

    RelayLoop._run_batch = slow_batch  # type: ignore[method-assign]
    try:
        for loop in loops:
            await loop.start()
        await eventually(lambda: _true(inside == {"relay-0", "relay-1"}))
        await add_events(pool, 1)
        wakeups.notify()  # both loops are busy: nobody to wake now
        gates["relay-0"].set()  # relay-0 finishes first; relay-1 stays stuck
        await eventually(lambda: _xlen_is(redis, 1), timeout=5)
        assert not gates["relay-1"].is_set()
    finally:
        for gate in gates.values():
            gate.set()
        for loop in loops:
            await loop.stop()
        RelayLoop._run_batch = original  # type: ignore[method-assign]


async def test_after_noscript_only_the_refused_chunks_run_again(redis: aioredis.Redis) -> None:
    """The pipeline is not atomic: when another relay loads the script between two chunks,
    the first gets NOSCRIPT and the second runs. Sending both again would XADD the second
    twice when the dedupe is skipped (the reconciler's `force`)."""
    publisher = Publisher(redis, 60)
    rows: list[Row] = []
    for queue in ("qa", "qb"):
        for _ in range(2):
            env = Envelope(
                event_id=str(uuid.uuid4()),
                type="t",
                payload={},
                created_at=datetime.now(UTC),
                headers={},
            )
            rows.append(Row(len(rows) + 1, queue, env.event_id, env.encode()))
    await redis.script_load(PUBLISH_SCRIPT)
    real_run = publisher._run
    calls: list[list[str]] = []

    async def racing_run(rows_: Any, chunks: Any, republish: bool) -> list[Any]:
        calls.append([q for q, _ in chunks])
        if len(calls) > 1:
            return await real_run(rows_, chunks, republish)
        # As in the race: the first chunk was refused before the script was loaded, the
        # second ran.
        (second,) = await real_run(rows_, chunks[1:], republish)
        return [NoScriptError("NOSCRIPT No matching script."), second]

    publisher._run = racing_run  # type: ignore[method-assign,assignment]
    ids = await publisher.publish(rows, republish=True)
    assert calls == [["qa", "qb"], ["qa"]]  # only the refused chunk went again
    assert await redis.xlen(stream_key("qa")) == 2
    assert await redis.xlen(stream_key("qb")) == 2
    # Each row has the id of its own entry (two streams may give the same ids).
    for queue, mine in (("qa", ids[:2]), ("qb", ids[2:])):
        entries: Any = await redis.xrange(stream_key(queue))
        assert [sid.decode() for sid, _ in entries] == mine


# -- the relay's asynchronous commits --------------------------------------------------


@pytest.fixture(scope="module")
def lazy_pg(workdir: Path) -> Iterator[PostgresServer]:
    """A Postgres that writes the WAL of asynchronous commits out only every 10 s (and has
    no autovacuum to flush it sooner, or to ANALYZE): a kill -9 within that time loses
    them."""
    server = PostgresServer(
        workdir / "pg-lazy" / "data",
        durable=False,
        log=workdir / "postgres-lazy.log",
        settings={"wal_writer_delay": "10s", "autovacuum": "off"},
    )
    server.start()
    asyncio.run(migrate(server.dsn))
    yield server
    server.stop()


async def relay_pool(server: PostgresServer) -> asyncpg.Pool[Any]:
    return await create_pool(server.dsn, durable_commits=False)  # as relay.__main__


async def crash(server: PostgresServer, pool: asyncpg.Pool[Any]) -> asyncpg.Pool[Any]:
    """kill -9 Postgres, start it again (recovering from its WAL), and open a new pool."""
    server.kill()
    pool.terminate()
    server.start()
    return await relay_pool(server)


async def test_marks_a_postgres_crash_loses_are_redone_without_publishing_twice(
    lazy_pg: PostgresServer, redis_server: RedisServer, redis: aioredis.Redis
) -> None:
    settings = relay_settings(lazy_pg, redis_server, batch_size=100)
    await truncate_tables(lazy_pg.dsn)
    durable = await create_pool(lazy_pg.dsn)
    await add_events(durable, 5)  # the signups' own commits are durable
    await durable.close()
    pool = await relay_pool(lazy_pg)
    try:
        assert await pool.fetchval("SHOW synchronous_commit") == "off"
        await RelayLoop(pool, redis, settings).run_once()
        first = await stream_ids(redis)
        assert len(first) == 5

        pool = await crash(lazy_pg, pool)
        # The crash took the marks with it: the rows are due again...
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 5
        await RelayLoop(pool, redis, settings).run_once()
        # ...and the next batch finds the first XADDs by their dedupe keys.
        assert await redis.xlen(stream_key()) == 5
        marked = await pool.fetch("SELECT stream_id FROM outbox ORDER BY id")
        assert [r["stream_id"].encode() for r in marked] == first
    finally:
        await pool.close()


async def test_a_republish_survives_a_postgres_crash(
    lazy_pg: PostgresServer, redis_server: RedisServer, redis: aioredis.Redis
) -> None:
    """The reconciler's republish is not progress that can be redone: were its new stream
    id lost, the next check would find the old one missing and publish a second time."""
    settings = relay_settings(lazy_pg, redis_server, batch_size=100)
    await truncate_tables(lazy_pg.dsn)
    durable = await create_pool(lazy_pg.dsn)
    await add_events(durable, 3)
    await RelayLoop(durable, redis, settings).run_once()
    await durable.close()
    await redis.flushall()  # Redis loses the entries and their dedupe keys

    publisher = Publisher(redis, settings.dedupe_ttl_seconds)
    pool = await relay_pool(lazy_pg)
    try:
        assert await Reconciler(pool, redis, publisher, after_seconds=0.0).run_once() == 3
        new = await stream_ids(redis)

        pool = await crash(lazy_pg, pool)
        marked = await pool.fetch("SELECT stream_id FROM outbox ORDER BY id")
        assert [r["stream_id"].encode() for r in marked] == new
        assert await Reconciler(pool, redis, publisher, after_seconds=0.0).run_once() == 0
        assert await redis.xlen(stream_key()) == 3
    finally:
        await pool.close()


async def outbox_seq_tup_read(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval(
            "SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'outbox'"
        )
    finally:
        await conn.close()
    return int(value)


@pytest.mark.parametrize("custom_plans", [False, True])
async def test_batch_updates_use_the_indexes_as_an_empty_outbox_grows(
    lazy_pg: PostgresServer, custom_plans: bool
) -> None:
    """Signups, relay batches and worker completions, one by one from an empty outbox, on
    one connection as the services run them. With generic plans (the control) the batch
    UPDATEs keep the sequential scans planned for the empty table; the services' pools
    (custom_plans=True) read no more rows than they change. On the server without
    autovacuum: an ANALYZE in the middle would replan both."""
    await truncate_tables(lazy_pg.dsn)
    before = await outbox_seq_tup_read(lazy_pg.dsn)
    service_pool = await create_pool(lazy_pg.dsn, max_size=1, custom_plans=custom_plans)
    try:
        async with service_pool.acquire() as conn:
            for i in range(300):
                async with conn.transaction():
                    await enqueue(conn, "t", {"i": i})
                async with conn.transaction():
                    recs = await conn.fetch(_CLAIM, 1000)
                    sids = [f"{i}-0"] * len(recs)
                    await conn.execute(_MARK_PUBLISHED, [r["id"] for r in recs], sids)
                await conn.execute(_MARK_COMPLETED, [r["event_id"] for r in recs])
            await conn.execute("SELECT pg_stat_force_next_flush()")
    finally:
        await service_pool.close()
    read = await outbox_seq_tup_read(lazy_pg.dsn) - before
    if custom_plans:
        assert read < 300, read
    else:
        assert read > 5_000, read  # O(n^2): the whole table, once per batch


async def test_migrate_refuses_a_directory_without_migrations(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """A wrong MIGRATIONS_DIR applied nothing and exited 0, leaving the API unready."""
    with pytest.raises(ConfigError, match="no migrations directory at"):
        await migrate(pg_server.dsn, tmp_path / "missing")
    (tmp_path / "README").write_text("not a migration")
    with pytest.raises(ConfigError, match=r"no migrations \(NNN_name.sql\) in"):
        await migrate(pg_server.dsn, tmp_path)


async def test_migrate_waits_for_a_postgres_still_starting(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """Its port opens a second after the run began (compose's healthcheck can pass before
    Postgres takes TCP connections): the run waits for it instead of failing at once."""
    dsn = pg_server.create_database(f"migrate_wait_{uuid.uuid4().hex[:8]}")
    target = urlsplit(dsn)
    port = free_port()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def open_later() -> asyncio.Server:
        await asyncio.sleep(1.0)
        return await asyncio.start_server(forward, "127.0.0.1", port)

    (tmp_path / "001_a.sql").write_text("CREATE TABLE a (id int);\n")
    opener = asyncio.create_task(open_later())
    try:
        via_proxy = target._replace(netloc=f"{target.netloc.rsplit('@', 1)[0]}@127.0.0.1:{port}")
        assert await migrate(urlunsplit(via_proxy), tmp_path) == [1]
    finally:
        server = await opener
        server.close()
    assert "a" in await _tables(dsn)


@contextlib.asynccontextmanager
async def slow_link(port: int, delay: float) -> AsyncIterator[int]:
    """A TCP proxy to 127.0.0.1:`port` that holds each chunk a client sends for `delay`
    seconds: every round trip through it takes at least that long. Its port."""

    async def carry(src: asyncio.StreamReader, dst: asyncio.StreamWriter, wait: float) -> None:
        try:
            while data := await src.read(65536):
                await asyncio.sleep(wait)
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()

    handlers: set[asyncio.Task[Any]] = set()

    async def carry_both(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            carry(reader, up_writer, delay), carry(up_reader, writer, 0), return_exceptions=True
        )

    def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(carry_both(reader, writer))
        handlers.add(task)
        task.add_done_callback(handlers.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def test_publishing_row_by_row_stops_before_its_transaction_idles_out(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    redis_server: RedisServer,
    settings: RelaySettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a refusal the relay publishes its batch one row at a time, inside the claim's
    transaction, which Postgres ends after idle_in_transaction_session_timeout without a
    statement: with Redis slow, a batch of 1,000 at 60 ms a call would have been rolled
    back and claimed again, over and over. It stops within its budget (0.3 s here), marks
    what it published, and leaves the rows it did not reach due, uncounted, for the next
    batch. Redis is slow for real: the relay reaches it through a link that holds each
    request 20 ms."""
    monkeypatch.setattr(publisher_mod, "ONE_BY_ONE_BUDGET_SECONDS", 0.3)
    await redis.set(stream_key("broken"), "not a stream")
    await add_events(pool, 1, queue="broken")
    good = await add_events(pool, 40)

    def published() -> Awaitable[int]:
        return pool.fetchval(
            "SELECT count(*) FROM outbox WHERE queue = 'default' AND published_at IS NOT NULL"
        )

    async with slow_link(redis_server.port, 0.02) as port:
        slow = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}")
        try:
            relay = RelayLoop(pool, slow, settings)
            more = await relay.run_once()
            done = await published()
            assert 0 < done < len(good)
            untouched = await pool.fetchval(
                "SELECT count(*) FROM outbox WHERE queue = 'default' AND published_at IS NULL"
                " AND publish_attempts = 0 AND last_error IS NULL AND available_at <= now()"
            )
            assert untouched == len(good) - done
            assert more  # the loop goes round again at once for the rest
            while await relay.run_once():
                pass
        finally:
            await slow.aclose()
    assert await published() == len(good)
    assert sorted(e.event_id for e in await stream_events(redis)) == sorted(good)
