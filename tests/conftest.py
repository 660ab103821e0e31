"""Real servers for the whole suite: PostgreSQL, Redis and an SMTP sink, started here.

Each test gets clean tables, an empty Redis and an empty mailbox. Nothing is mocked that
can exist on this machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from devstack.postgres import PostgresServer, truncate_tables
from devstack.procs import free_port, make_traversable
from devstack.redis import RedisServer
from devstack.smtp_sink import SmtpSink
from shared.connections import create_pool, create_redis
from shared.migrate import migrate


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    # Not pytest's tmp_path: its root is private to root, and Postgres runs as nobody.
    path = Path(tempfile.mkdtemp(prefix="outbox-tests-"))
    make_traversable(path)
    yield path
    if not os.environ.get("KEEP_TEST_DATA"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server(workdir: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(workdir / "pg" / "data", durable=False, log=workdir / "postgres.log")
    server.start()
    asyncio.run(migrate(server.dsn))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir / "redis", log=workdir / "redis.log")
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def smtp_sink(workdir: Path) -> Iterator[SmtpSink]:
    sink = SmtpSink(workdir / "mail")
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
async def clean(pg_server: PostgresServer, redis_server: RedisServer, smtp_sink: SmtpSink) -> None:
    """Empty tables, Redis and mailbox before the test."""
    if pg_server.proc is None:
        pg_server.start()
    if redis_server.proc is None:
        redis_server.start()
    await truncate_tables(pg_server.dsn)
    r = create_redis(redis_server.url)
    await r.flushall()
    await r.aclose()
    for f in smtp_sink.directory.glob("*.eml"):
        f.unlink()
    handler = smtp_sink.handler
    handler.fail_with = handler.fail_mail_with = handler.fail_rcpt_with = ""
    smtp_sink.handler.fail_with = ""
    smtp_sink.handler.delay_seconds = 0.0


@pytest.fixture
async def pool(pg_server: PostgresServer, clean: None) -> AsyncIterator[asyncpg.Pool[Any]]:
    p = await create_pool(pg_server.dsn, max_size=10)
    yield p
    await p.close()


@pytest.fixture
async def redis(redis_server: RedisServer, clean: None) -> AsyncIterator[aioredis.Redis]:
    r = create_redis(redis_server.url)
    yield r
    await r.aclose()


@pytest.fixture
def service_env(
    pg_server: PostgresServer, redis_server: RedisServer, smtp_sink: SmtpSink
) -> dict[str, str]:
    """The environment the services get: local servers, cheap hashing, short timeouts."""
    return {
        "DATABASE_URL": pg_server.dsn,
        "REDIS_URL": redis_server.url,
        "SMTP_URL": smtp_sink.url,
        "PUBLIC_BASE_URL": "http://127.0.0.1:8000",
        "MAIL_FROM": "Signup <no-reply@signup.test>",
        "ARGON2_TIME_COST": "1",
        "ARGON2_MEMORY_KIB": "1024",
        # DEBUG: every line a service can write is checked for secrets (test_e2e).
        "LOG_LEVEL": "DEBUG",
        "METRICS_HOST": "127.0.0.1",
        "API_HOST": "127.0.0.1",
        "SHUTDOWN_GRACE_SECONDS": "5",
    }


@pytest.fixture
def ports() -> dict[str, int]:
    return {"api": free_port(), "relay": free_port(), "worker": free_port()}


# Log events that mean a loop or a request hit an exception it did not expect.
_FAILURE_EVENTS = {
    "loop_iteration_failed",
    "worker_loop_failed",
    "worker_entry_failed",
    "request_failed",
    "service_stop_failed",
    "app_shutdown_hook_failed",
}


@pytest.fixture(autouse=True)
def no_unexpected_loop_failures(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """A test fails if code it ran in this process logged an unhandled failure, unless it
    injects one on purpose (marker `expect_loop_failures`)."""
    yield
    if request.node.get_closest_marker("expect_loop_failures"):
        return
    failures = [
        r.getMessage()
        for when in ("setup", "call")
        for r in caplog.get_records(when)
        if r.getMessage() in _FAILURE_EVENTS
    ]
    assert not failures, f"unexpected failures logged: {failures}"


# Before pytest-timeout's 300 s: a test that hangs in an await shows only the event loop's
# select in the timeout's traceback, so where each task waits is printed first.
HANG_DUMP_AFTER_SECONDS = float(os.environ.get("TEST_HANG_DUMP_AFTER_SECONDS", "240"))


def _print_tasks() -> None:
    tasks = asyncio.all_tasks()
    print(f"test still running after {HANG_DUMP_AFTER_SECONDS:g}s; {len(tasks)} tasks:")
    for task in tasks:
        task.print_stack(limit=12, file=sys.stdout)


@pytest.fixture(autouse=True)
async def print_tasks_if_hung() -> AsyncIterator[None]:
    timer = asyncio.get_running_loop().call_later(HANG_DUMP_AFTER_SECONDS, _print_tasks)
    try:
        yield
    finally:
        timer.cancel()
