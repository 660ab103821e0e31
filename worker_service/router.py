"""Handlers registered by task type, like routes on an HTTP mux.

    router = Router()

    @router.handler("send_verify_email", timeout=30)
    async def send_verify_email(ctx: TaskContext) -> None: ...

The worker loads a router with `--app module:router`. Startup hooks build what handlers
share (pools, clients) into `ctx.state`; shutdown hooks release it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from shared.envelope import Envelope


@dataclass(slots=True)
class TaskContext:
    """What a handler gets: the task, its attempt number, and the worker's resources."""

    envelope: Envelope
    attempt: int
    stream_id: str
    pool: asyncpg.Pool[Any]
    redis: aioredis.Redis
    state: dict[str, Any]

    @property
    def payload(self) -> dict[str, Any]:
        return self.envelope.payload

    @property
    def event_id(self) -> str:
        return self.envelope.event_id


Handler = Callable[[TaskContext], Awaitable[None]]
Hook = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Route:
    task_type: str
    handler: Handler
    timeout: float | None
    max_attempts: int | None


@dataclass
class Router:
    routes: dict[str, Route] = field(default_factory=dict)
    startup_hooks: list[Hook] = field(default_factory=list)
    shutdown_hooks: list[Hook] = field(default_factory=list)
    # Run at process start, before any connection: a ConfigError there exits 2 with its
    # one line, as a worker setting does, even with Postgres or Redis unreachable.
    config_checks: list[Callable[[], object]] = field(default_factory=list)

    def handler(
        self, task_type: str, *, timeout: float | None = None, max_attempts: int | None = None
    ) -> Callable[[Handler], Handler]:
        """Register a handler; timeout and max_attempts override the worker's defaults."""

        def register(fn: Handler) -> Handler:
            if task_type in self.routes:
                raise ValueError(f"a handler for {task_type!r} is registered already")
            self.routes[task_type] = Route(task_type, fn, timeout, max_attempts)
            return fn

        return register

    def on_config_check(self, fn: Callable[[], object]) -> Callable[[], object]:
        self.config_checks.append(fn)
        return fn

    def on_startup(self, fn: Hook) -> Hook:
        self.startup_hooks.append(fn)
        return fn

    def on_shutdown(self, fn: Hook) -> Hook:
        self.shutdown_hooks.append(fn)
        return fn

    def get(self, task_type: str) -> Route | None:
        return self.routes.get(task_type)


def load_app(spec: str) -> Router:
    """Import `module:attribute` and check that it is a Router."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--app must be module:attribute, not {spec!r}")
    obj = getattr(importlib.import_module(module_name), attr, None)
    if not isinstance(obj, Router):
        raise ValueError(f"{spec} is not a worker_service.Router")
    return obj
