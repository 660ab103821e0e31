"""The aiohttp application: routes, middlewares, and the resources they share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from api_service.context import APP_KEY, ApiContext
from api_service.health import healthz, readyz
from api_service.metrics import metrics_middleware
from api_service.openapi import build_openapi
from api_service.passwords import Hasher
from api_service.problems import problem_middleware
from api_service.request_id import request_id_middleware
from api_service.resend import resend_verify_email
from api_service.settings import ApiSettings
from api_service.users import create_user
from api_service.verify import verify_email
from shared.connections import close_pool, create_pool
from shared.http_probe import metrics_handler

# After the in-flight requests (aiohttp's shutdown_timeout, the grace): closing the pool
# is quick unless Postgres went silent, when its connections are dropped instead.
POOL_CLOSE_SECONDS = 2.0


def create_app(settings: ApiSettings, pool: asyncpg.Pool[Any] | None = None) -> web.Application:
    """Build the app; with no pool given, one is created at startup and closed at cleanup."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[request_id_middleware, metrics_middleware, problem_middleware],
    )
    openapi = orjson.dumps(build_openapi())

    async def resources(app: web.Application) -> AsyncIterator[None]:
        own_pool = pool is None
        db = pool or await create_pool(settings.database_url, max_size=settings.db_pool_size)
        hasher = Hasher(
            time_cost=settings.argon2_time_cost,
            memory_kib=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            threads=settings.hash_threads,
            max_waiting=settings.max_waiting_hashes,
        )
        app[APP_KEY] = ApiContext(settings, db, hasher)
        yield
        hasher.close()
        if own_pool:
            await close_pool(db, POOL_CLOSE_SECONDS)

    async def openapi_json(_request: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    app.cleanup_ctx.append(resources)
    app.router.add_post("/v1/users", create_user)
    app.router.add_post("/v1/verify_email/resend", resend_verify_email)
    # Not HEAD: the link is single-use, and link scanners and unfurlers send HEAD.
    app.router.add_get("/v1/verify_email", verify_email, allow_head=False)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.json", openapi_json)
    return app
