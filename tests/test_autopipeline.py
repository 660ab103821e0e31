"""The handlers' auto-pipelining Redis client, against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from devstack.redis import RedisServer
from shared.autopipeline import AutoPipelineRedis, _pack
from shared.connections import create_redis


def counting(client: AutoPipelineRedis) -> list[int]:
    """Record the size of every pipeline the client sends."""
    sizes: list[int] = []
    send = client._send

    async def spy(batch: list[Any]) -> None:
        sizes.append(len(batch))
        await send(batch)

    client._send = spy  # type: ignore[method-assign]
    return sizes


@contextlib.asynccontextmanager
async def silent_server(**redis_kwargs: Any) -> AsyncIterator[tuple[aioredis.Redis, list[Any]]]:
    """A client of a server that accepts connections and never answers: (client, the
    accepted connections)."""
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    base = create_redis(f"redis://127.0.0.1:{port}", health_check_interval=0, **redis_kwargs)
    try:
        yield base, accepted
    finally:
        await base.aclose()
        server.close()
        for writer in accepted:
            writer.close()


async def test_one_turn_of_commands_is_one_pipeline_and_each_caller_gets_its_reply(
    redis: aioredis.Redis,
) -> None:
    client = AutoPipelineRedis(connection_pool=redis.connection_pool)
    sizes = counting(client)
    replies = await asyncio.gather(*(client.incr("ap:n") for _ in range(100)))
    assert sorted(replies) == list(range(1, 101))
    assert sizes == [100]
    # Response callbacks apply as on the plain client.
    await client.set("ap:s", "x")
    assert await client.get("ap:s") == b"x"
    assert await client.exists("ap:s", "ap:missing") == 1
    assert await client.hset("ap:h", mapping={"a": "1"}) == 1
    assert await client.hgetall("ap:h") == {b"a": b"1"}


async def test_an_error_reaches_only_its_own_caller(redis: aioredis.Redis) -> None:
    client = AutoPipelineRedis(connection_pool=redis.connection_pool)
    await redis.set("ap:text", "not a number")
    results = await asyncio.gather(
        client.incr("ap:n"), client.incr("ap:text"), client.incr("ap:n"), return_exceptions=True
    )
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ResponseError)


async def test_an_argument_that_cannot_be_sent_fails_only_its_own_caller(
    redis: aioredis.Redis,
) -> None:
    """redis-py refuses None as a value (DataError) before sending: the other commands
    of the same turn still go, in one pipeline."""
    client = AutoPipelineRedis(connection_pool=redis.connection_pool)
    sizes = counting(client)
    results = await asyncio.gather(
        client.incr("ap:n"),
        client.set("ap:bad", None),  # type: ignore[arg-type]
        client.incr("ap:n"),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], DataError)
    assert sizes == [3]
    assert await redis.exists("ap:bad") == 0


async def test_a_reply_its_callback_refuses_fails_only_its_own_caller(
    redis: aioredis.Redis,
) -> None:
    client = AutoPipelineRedis(connection_pool=redis.connection_pool)

    def refuse(response: Any, **kwargs: Any) -> Any:
        raise ValueError(f"cannot parse {response!r}")

    client.set_response_callback("ECHO", refuse)
    results = await asyncio.gather(
        client.incr("ap:n"), client.echo("x"), client.incr("ap:n"), return_exceptions=True
    )
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ValueError)
    assert await client.incr("ap:n") == 3  # the connection is still in step


async def test_a_flush_cancelled_while_connecting_cancels_its_callers() -> None:
    """At shutdown the flush task may be cancelled before it has a connection: its
    callers must hear it, not wait forever."""
    async with silent_server() as (base, accepted):  # never answers the handshake
        client = AutoPipelineRedis(connection_pool=base.connection_pool)
        callers = [asyncio.ensure_future(client.incr("ap:n")) for _ in range(3)]
        await asyncio.sleep(0.2)  # the flush is now stuck connecting
        assert len(accepted) == 1 and not any(c.done() for c in callers)
        (flush,) = client._flushes
        flush.cancel()
        results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results


@pytest.mark.parametrize(
    "args",
    [
        ("INCRBY", "bench:count", 1),
        ("SET", "k", "zoë ✓", "EX", 10),
        ("SET", b"k\x00\xff", b"", "NX"),
        ("INCRBY", "k", -(10**20)),
        ("CONFIG GET", "maxmemory"),  # a two-word name: redis-py splits it
        ("ZADD", "z", 1.5, "m"),  # floats: redis-py's repr
        ("SET", "k", memoryview(b"view")),
        ("SET", "k", bytearray(b"array")),
    ],
)
def test_the_fast_packer_sends_what_redis_py_would(args: tuple[Any, ...]) -> None:
    conn = Connection()
    assert b"".join(_pack(conn, args)) == b"".join(conn.pack_command(*args))


@pytest.mark.parametrize(
    ("bad", "error"),
    [(None, DataError), (True, DataError), ("\ud800", UnicodeEncodeError), (object(), DataError)],
)
def test_the_fast_packer_refuses_what_redis_py_refuses(bad: Any, error: type[Exception]) -> None:
    conn = Connection()
    with pytest.raises(error):
        conn.pack_command("SET", "k", bad)
    with pytest.raises(error):
        _pack(conn, ("SET", "k", bad))


async def test_blocking_commands_do_not_hold_the_batch(redis: aioredis.Redis) -> None:
    client = AutoPipelineRedis(connection_pool=redis.connection_pool)
    sizes = counting(client)
    blpop = asyncio.ensure_future(client.blpop(["ap:list"], timeout=5))
    assert list(await asyncio.gather(client.incr("ap:a"), client.incr("ap:b"))) == [1, 1]
    assert not blpop.done()  # still waiting, on its own connection
    await client.rpush("ap:list", "item")
    got = await blpop
    assert got is not None and tuple(got) == (b"ap:list", b"item")
    assert sum(sizes) == 3  # the two INCRs and the RPUSH; BLPOP went straight through


async def test_a_caller_that_gives_up_does_not_disturb_the_others(redis: aioredis.Redis) -> None:
    client = AutoPipelineRedis(connection_pool=redis.connection_pool)
    gone = asyncio.ensure_future(client.incr("ap:n"))
    kept = asyncio.ensure_future(client.incr("ap:n"))
    await asyncio.sleep(0)  # both queued
    gone.cancel()
    assert await kept in (1, 2)
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_a_lost_connection_fails_every_caller_then_recovers(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    server = RedisServer(tmp_path / "data")
    server.start()
    base = create_redis(server.url)
    client = AutoPipelineRedis(connection_pool=base.connection_pool)
    try:
        assert await client.incr("ap:n") == 1
        server.stop()
        results = await asyncio.gather(
            *(client.incr("ap:n") for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, RedisConnectionError) for r in results), results
        server.start()
        assert await client.incr("ap:n") == 2  # appendonly: the count survived the restart
    finally:
        await base.aclose()
        server.stop()


async def test_a_silent_server_times_out_every_caller_once() -> None:
    """One timer covers the batch: callers hear a redis TimeoutError, not a hang."""
    async with silent_server(socket_timeout=0.3) as (base, accepted):
        client = AutoPipelineRedis(connection_pool=base.connection_pool)
        sizes = counting(client)
        results = await asyncio.wait_for(
            asyncio.gather(*(client.incr("ap:n") for _ in range(3)), return_exceptions=True), 5
        )
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        assert sizes == [3]
        assert len(accepted) == 1


async def test_reply_options_apply_as_on_the_plain_client(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """NEVER_DECODE (DUMP's binary reply on a decoding client) and response callbacks."""
    base = create_redis(redis_server.url, decode_responses=True)
    client = AutoPipelineRedis(connection_pool=base.connection_pool)
    try:
        await base.set("ap:dump", "v")
        dumped, plain = await asyncio.gather(client.dump("ap:dump"), base.dump("ap:dump"))
        assert isinstance(dumped, bytes) and dumped == plain
        assert await client.get("ap:dump") == "v"  # decoded, like the plain client
        assert await client.set("ap:x", "1", nx=True) is True
        assert await client.set("ap:x", "1", nx=True) is None
        assert await client.zadd("ap:z", {"a": 1.5}) == 1
        assert await client.zrange("ap:z", 0, -1, withscores=True) == [("a", 1.5)]
    finally:
        await base.aclose()
