"""`python -m api_service`: serve the HTTP API."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from api_service.app import create_app
from api_service.settings import ApiSettings
from shared import entrypoint
from shared.lifecycle import install_signal_handlers

logger = logging.getLogger("api_service")


async def serve(cfg: ApiSettings) -> None:
    # aiohttp waits its shutdown timeout twice for a request in flight: for the handler to
    # end, then again after cancelling the request, before it cancels the handler's task.
    # Half the grace each keeps the stop within the grace (and the pool's close after it).
    runner = web.AppRunner(
        create_app(cfg), access_log=None, shutdown_timeout=cfg.shutdown_grace_seconds / 2
    )
    await runner.setup()
    site = web.TCPSite(runner, cfg.api_host, cfg.api_port, backlog=1024)
    await site.start()
    logger.info("api_listening", extra={"host": cfg.api_host, "port": cfg.api_port})
    stop = asyncio.Event()
    install_signal_handlers(stop)
    await stop.wait()
    # cleanup() stops accepting, lets in-flight requests finish within the grace (a request
    # still running then is cancelled), then closes the pool.
    logger.info("api_stopping", extra={"grace": cfg.shutdown_grace_seconds})
    await runner.cleanup()
    logger.info("api_stopped")


def main() -> None:
    cfg = entrypoint.load_settings("api_service", ApiSettings)
    entrypoint.run("api", cfg.log_level, lambda: serve(cfg))


if __name__ == "__main__":
    main()
