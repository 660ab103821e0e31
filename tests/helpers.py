"""Small helpers the tests share: waiting on conditions, reading the mailbox, signups."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from pydantic_settings import BaseSettings

from devstack.mail import verification_link
from devstack.postgres import PostgresServer
from devstack.procs import free_port, wait_for_port
from devstack.redis import RedisServer
from devstack.services import ServiceProcess
from relay.settings import RelaySettings
from worker_service.settings import WorkerSettings


@contextlib.contextmanager
def api_process(dsn: str, log: Path, **env: str) -> Iterator[tuple[ServiceProcess, str]]:
    """`python -m api_service` on a free local port against `dsn`, with `env` on top;
    (the process, its base URL). It must exit 0 on SIGTERM at the end."""
    port = free_port()
    api = ServiceProcess(
        "api",
        {"DATABASE_URL": dsn, "API_HOST": "127.0.0.1", "API_PORT": str(port), **env},
        log,
    ).start()
    try:
        wait_for_port(port, 30, api.proc)
        yield api, f"http://127.0.0.1:{port}"
    finally:
        assert api.terminate() == 0


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 20.0, interval: float = 0.05
) -> None:
    """Wait until check() is true; fail with the timeout otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def text_part(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None
    content: str = part.get_content()
    return content


def verify_link(msg: EmailMessage) -> str:
    link = verification_link(msg)
    assert link, "no verification link in the email"
    return link


def link_params(link: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(link).query).items()}


def signup_body(i: int | str, **overrides: Any) -> dict[str, Any]:
    body = {
        "username": f"user_{i}",
        "full_name": f"User {i}",
        "email": f"user{i}@example.com",
        "password": "correct horse battery",
    }
    body.update(overrides)
    return body


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def settings_of(cls: type[SettingsT], **fields: Any) -> SettingsT:
    """Settings built from field names (`batch_size=5`): the services take only their
    environment variables' names (`RELAY_BATCH_SIZE`) as input, so each field goes in under
    its variable's name. A name that is no field is an error here, not a setting ignored."""
    return cls(**{(cls.model_fields[name].alias or name): v for name, v in fields.items()})


def relay_settings(pg: PostgresServer, rs: RedisServer, **kw: Any) -> RelaySettings:
    """A relay's settings against the test servers."""
    return settings_of(RelaySettings, database_url=pg.dsn, redis_url=rs.url, **kw)


def worker_settings(pg: PostgresServer, rs: RedisServer, **kw: Any) -> WorkerSettings:
    """A worker's settings against the test servers, its waits and backoffs short."""
    base: dict[str, Any] = {
        "database_url": pg.dsn,
        "redis_url": rs.url,
        "consumer_name": "w1",
        "retry_backoff_base_seconds": 0.05,
        "retry_backoff_max_seconds": 0.2,
        "max_attempts": 3,
        "reclaim_interval_seconds": 0.05,
        "block_ms": 100,
    }
    base.update(kw)
    return settings_of(WorkerSettings, **base)
