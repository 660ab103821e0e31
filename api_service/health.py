"""Liveness (the process answers) and readiness (it can reach Postgres)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from api_service import problems
from api_service.context import APP_KEY
from api_service.problems import ProblemError


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ctx = request.app[APP_KEY]
    try:
        async with asyncio.timeout(2):
            await ctx.pool.fetchval("SELECT 1")
    except Exception:
        raise ProblemError(
            503, problems.UNAVAILABLE, "Not ready", "The database is unreachable."
        ) from None
    return web.json_response({"status": "ready"})
