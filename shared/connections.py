"""Building Postgres pools and Redis clients from settings (no module-level clients)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import orjson

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from asyncpg.pool import PoolConnectionProxy

logger = logging.getLogger(__name__)

# A connection as handed out by a pool or opened on its own.
DbConn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"


# Postgres ends a session idle this long inside a transaction (create_pool).
IDLE_IN_TRANSACTION_SECONDS = 60.0
# The worker's handlers wait on other systems inside a transaction: the verification email
# holds its transaction through the SMTP conversation, up to its 60 s timeout and then,
# once the message is under way, up to five replies of up to SMTP_TIMEOUT_SECONDS (at most
# 100 s) each, then commits.
WORKER_IDLE_IN_TRANSACTION_SECONDS = 600.0


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    # jsonb in and out as Python objects, through orjson.
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
        format="text",
    )


async def _keep_session(conn: asyncpg.Connection[Any]) -> None:
    """Release without asyncpg's reset query (RESET ALL, UNLISTEN *, ...).

    That query is a round trip on every release: it doubled the cost of a pooled
    statement (0.22 ms against 0.12 ms, measured here). This code never changes session
    state on pooled connections (no SET, LISTEN or advisory locks there), and asyncpg still
    rolls back a transaction left open before calling this.
    """


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    durable_commits: bool = True,
    custom_plans: bool = False,
    idle_in_transaction_seconds: float = IDLE_IN_TRANSACTION_SECONDS,
) -> asyncpg.Pool[Any]:
    """A pool whose sessions run in UTC, and end when left idle inside a transaction.

    idle_in_transaction_seconds: Postgres ends a session that has waited this long, in a
    transaction, for its next statement (`idle_in_transaction_session_timeout`). A
    process frozen or cut off inside one (SIGSTOP, a VM paused, a partition, a host gone
    with its sockets) would otherwise keep its row locks, a relay's claimed batch, until
    TCP gives up (two hours and more) or for ever, and hold back vacuum for the whole
    database all that time. It must exceed the longest wait this code makes inside a
    transaction: the relay's Redis calls (REDIS_SOCKET_TIMEOUT_SECONDS each), the worker's
    SMTP conversation (see WORKER_IDLE_IN_TRANSACTION_SECONDS).

    durable_commits=False: commits return before their WAL reaches the disk
    (`synchronous_commit = off`), for writers whose every write can be lost in a crash of
    Postgres and redone (see relay.__main__). Such a commit is never reordered: any later
    durable commit, from any session, makes it durable too.

    custom_plans=True: every execution of a prepared statement is planned for its
    arguments and the table as it is now (`plan_cache_mode = force_custom_plan`). asyncpg
    prepares each statement once per connection, and after five executions Postgres may
    keep one generic plan until the next ANALYZE. For the relay's and worker's batch
    UPDATEs (`id` from `unnest($1)`, `event_id = ANY($1)`) a generic plan made while the
    outbox was small is a sequential scan, kept as the table grows: from an empty outbox
    under 500 signups/s, that was a quarter of Postgres's CPU. Planning costs tens of
    microseconds, once per batch.
    """
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
        command_timeout=30,
        # Timestamps Postgres renders as text (the relay's envelopes) read the same
        # whatever the server's or the role's TimeZone: a startup parameter, no round trip.
        server_settings={
            "TimeZone": "UTC",
            "idle_in_transaction_session_timeout": str(int(idle_in_transaction_seconds * 1000)),
        }
        | ({} if durable_commits else {"synchronous_commit": "off"})
        | ({"plan_cache_mode": "force_custom_plan"} if custom_plans else {}),
    )
    assert pool is not None
    return pool


async def close_pool(pool: asyncpg.Pool[Any], within: float) -> None:
    """Close the pool's connections gracefully, or drop them after `within` seconds. A
    graceful close waits for Postgres to acknowledge each connection's end, and one that
    has gone silent (a partition, a failover in progress) would hold the shutdown for the
    command timeout, past the stop grace, and then fail it."""
    try:
        await asyncio.wait_for(pool.close(), within)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        logger.warning("pool_close_abandoned", extra={"within": within})
        pool.terminate()


# How long a reply from Redis may take before the call fails with a TimeoutError. Without
# it, a Redis that stops answering without closing the connection (a partition, a
# failover, a stuck fsync) would hold the caller until TCP gives up, a quarter of an hour
# or more: a relay inside its claim transaction would keep its rows locked from every
# other relay all that time. A worker's blocking read adds its block time to this.
REDIS_SOCKET_TIMEOUT_SECONDS = 10.0


def create_redis(url: str, **kwargs: Any) -> aioredis.Redis:
    """A Redis client with a connection pool; responses stay bytes (envelopes are bytes)."""
    kwargs.setdefault("socket_timeout", REDIS_SOCKET_TIMEOUT_SECONDS)
    kwargs.setdefault("health_check_interval", 15)
    kwargs.setdefault("socket_connect_timeout", 5)
    kwargs.setdefault("socket_keepalive", True)
    # Imported here: the API never talks to Redis, and redis-py is 7 MiB of its RSS.
    from redis.asyncio import Redis

    return Redis.from_url(url, **kwargs)
