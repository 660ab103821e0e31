"""A tiny HTTP server for /metrics and /healthz, for the services that have no API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

logger = logging.getLogger(__name__)

# How long a scrape waits for the gauges it refreshes first (the worker asks Redis for its
# stream's figures): well within Prometheus's scrape_timeout (10 s, deploy/prometheus).
REFRESH_TIMEOUT_SECONDS = 3.0


async def metrics_handler(_request: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


class ProbeServer:
    """Serves /metrics, /healthz (process alive and loops running) on host:port."""

    name = "probe-server"

    def __init__(
        self,
        host: str,
        port: int,
        healthy: Callable[[], bool] = lambda: True,
        before_scrape: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self._healthy = healthy
        self._before_scrape = before_scrape
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        """The registry, refreshed first where that can be done. A refresh that fails or
        hangs (Redis down or silent) leaves those gauges at their last values and the rest
        is served all the same: a failed scrape would mark the replica down (`up` 0, the
        NoWorkerConsuming alert) and take its loop_errors_total, which says what fails,
        out of reach."""
        if self._before_scrape is not None:
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT_SECONDS):
                    await self._before_scrape()
            except Exception as e:  # TimeoutError included
                logger.warning(
                    "metrics_refresh_failed", extra={"error": f"{type(e).__name__}: {e}"}
                )
        return await metrics_handler(request)

    async def _healthz(self, _request: web.Request) -> web.Response:
        ok = self._healthy()
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self, grace: float = 5.0) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
