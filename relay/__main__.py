"""`python -m relay`: run one relay process."""

from __future__ import annotations

import logging

from relay.listener import Listener
from relay.maintenance import Maintenance
from relay.publisher import RelayLoop
from relay.reconciler import Reconciler
from relay.settings import RelaySettings
from shared import entrypoint
from shared.connections import create_pool, create_redis
from shared.http_probe import ProbeServer
from shared.lifecycle import run_until_signalled

logger = logging.getLogger("relay")


async def serve(cfg: RelaySettings) -> None:
    pool = await create_pool(cfg.database_url, max_size=cfg.db_pool_size)
    redis = create_redis(cfg.redis_url)
    relay = RelayLoop(pool, redis, cfg)
    listener = Listener(cfg.database_url, relay.wake)
    reconciler = Reconciler(pool, redis, relay.publisher, after_seconds=cfg.reconcile_after_seconds)
    maintenance = Maintenance(pool, reconciler, cfg)
    probe = ProbeServer(
        cfg.metrics_host, cfg.metrics_port, healthy=lambda: relay.running and listener.running
    )

    async def close() -> None:
        await redis.aclose()
        await pool.close()

    await run_until_signalled(
        [probe, listener, relay, maintenance], cfg.shutdown_grace_seconds, close
    )


def main() -> None:
    cfg = entrypoint.load_settings("relay", RelaySettings)
    entrypoint.run("relay", cfg.log_level, lambda: serve(cfg))


if __name__ == "__main__":
    main()
