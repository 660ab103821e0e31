"""Liveness (the process answers) and readiness (Postgres answers, with the schema this
code needs)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from api_service import problems
from api_service.context import APP_KEY
from api_service.problems import ProblemError
from shared.migrate import SCHEMA_VERSION, schema_version


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ctx = request.app[APP_KEY]
    try:
        async with asyncio.timeout(2):
            version = await schema_version(ctx.pool)
    except Exception:
        raise ProblemError(
            503, problems.UNAVAILABLE, "Not ready", "The database is unreachable."
        ) from None
    if version < SCHEMA_VERSION:
        raise ProblemError(
            503,
            problems.UNAVAILABLE,
            "Not ready",
            f"The database schema is at version {version}; this release needs"
            f" {SCHEMA_VERSION}. Run the migrations (python -m shared.migrate).",
        )
    return web.json_response({"status": "ready"})
