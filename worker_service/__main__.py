"""`python -m worker_service --app module:router`: run one worker process."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import asyncpg

from shared import entrypoint
from shared.connections import (
    REDIS_SOCKET_TIMEOUT_SECONDS,
    WORKER_IDLE_IN_TRANSACTION_SECONDS,
    close_pool,
    create_pool,
    create_redis,
)
from shared.errors import ConfigError
from shared.http_probe import ProbeServer
from shared.lifecycle import run_until_signalled
from worker_service.consumer import Worker
from worker_service.maintenance import WorkerMaintenance, refresh_gauges
from worker_service.router import Router, load_app
from worker_service.settings import WorkerSettings

# Connections of the worker's own, beside DB_POOL_SIZE for its handlers.
BOOKKEEPING_CONNECTIONS = 2


async def open_pools(cfg: WorkerSettings) -> tuple[asyncpg.Pool[Any], asyncpg.Pool[Any]]:
    """The handlers' pool, whose transactions may wait through an SMTP conversation, and
    the worker's own for its writes (Worker.bookkeeping), on connections no handler holds.
    Custom plans: the batched completion UPDATE must not keep a plan made for an empty
    outbox (see create_pool)."""
    pool = await create_pool(
        cfg.database_url,
        max_size=cfg.db_pool_size,
        custom_plans=True,
        idle_in_transaction_seconds=WORKER_IDLE_IN_TRANSACTION_SECONDS,
    )
    try:
        bookkeeping = await create_pool(
            cfg.database_url, min_size=1, max_size=BOOKKEEPING_CONNECTIONS, custom_plans=True
        )
    except BaseException:
        await pool.close()
        raise
    return pool, bookkeeping


async def serve(cfg: WorkerSettings, router: Router) -> None:
    pool, bookkeeping = await open_pools(cfg)
    # Its reads block for up to block_ms: the socket timeout counts from there.
    redis = create_redis(
        cfg.redis_url, socket_timeout=REDIS_SOCKET_TIMEOUT_SECONDS + cfg.block_ms / 1000
    )
    worker = Worker(router, pool, redis, cfg, bookkeeping=bookkeeping)
    maintenance = WorkerMaintenance(
        worker.queue,
        cfg.consumer_name,
        cfg.consumer_idle_cleanup_seconds,
        cfg.maintenance_interval_seconds,
    )

    async def scrape() -> None:
        await refresh_gauges(worker.queue)

    probe = ProbeServer(
        cfg.metrics_host, cfg.metrics_port, healthy=lambda: worker.running, before_scrape=scrape
    )

    async def close(within: float) -> None:
        await redis.aclose()
        await asyncio.gather(close_pool(pool, within), close_pool(bookkeeping, within))

    await run_until_signalled([probe, worker, maintenance], cfg.shutdown_grace_seconds, close)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker_service")
    parser.add_argument(
        "--app",
        default="worker_service.app:router",
        help="the Router to run, as module:attribute (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    cfg = entrypoint.load_settings("worker", WorkerSettings)
    try:
        router = load_app(args.app)
        for check in router.config_checks:
            check()
    except (ValueError, ImportError, ConfigError) as e:
        entrypoint.config_error("worker", e)
    entrypoint.run("worker", cfg.log_level, lambda: serve(cfg, router))


if __name__ == "__main__":
    main()
