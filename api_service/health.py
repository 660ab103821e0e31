"""Liveness (the process answers) and readiness (Postgres answers, takes writes, and has
the schema this code needs)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from aiohttp import web

from api_service import problems
from api_service.context import APP_KEY
from api_service.problems import ProblemError
from shared.migrate import SCHEMA_VERSION, schema_version

READY_TIMEOUT_SECONDS = 2.0

logger = logging.getLogger(__name__)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ctx = request.app[APP_KEY]
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            version = await schema_version(ctx.pool)
            # A standby (DATABASE_URL still pointing at a demoted primary after a failover)
            # or a role made read-only answers reads and fails every signup.
            read_only = await ctx.pool.fetchval(
                "SELECT current_setting('transaction_read_only') = 'on'"
            )
    except Exception as e:
        if isinstance(e, TimeoutError):
            detail = f"The database did not answer within {READY_TIMEOUT_SECONDS:g} s."
        elif isinstance(e, asyncpg.PostgresError):  # e.g. no privilege on schema_migrations
            detail = f"The database refused the readiness query ({type(e).__name__})."
        else:
            detail = "The database is unreachable."
        logger.warning("not_ready", extra={"reason": detail, "error": repr(e)})
        raise ProblemError(503, problems.UNAVAILABLE, "Not ready", detail) from None
    if read_only:
        detail = "The database is read-only (a standby, or default_transaction_read_only)."
        logger.warning("not_ready", extra={"reason": detail})
        raise ProblemError(503, problems.UNAVAILABLE, "Not ready", detail)
    if version < SCHEMA_VERSION:
        raise ProblemError(
            503,
            problems.UNAVAILABLE,
            "Not ready",
            f"The database schema is at version {version}; this release needs"
            f" {SCHEMA_VERSION}. Run the migrations (python -m shared.migrate).",
        )
    return web.json_response({"status": "ready"})
