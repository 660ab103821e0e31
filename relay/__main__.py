"""`python -m relay`: run one relay process."""

from __future__ import annotations

import logging

from relay.listener import Listener
from relay.maintenance import Maintenance
from relay.publisher import RelayLoop, Wakeups
from relay.reconciler import Reconciler
from relay.settings import RelaySettings
from shared import entrypoint
from shared.connections import close_pool, create_pool, create_redis
from shared.http_probe import ProbeServer
from shared.lifecycle import run_until_signalled

logger = logging.getLogger("relay")


async def serve(cfg: RelaySettings) -> None:
    # The relay's commits need not wait for the disk. What it writes is progress: a batch
    # marked published, a backoff, a retention purge. If Postgres crashes and loses a mark,
    # the rows are claimed again and their dedupe keys in Redis give back the stream ids of
    # the first XADD, so nothing is published twice (test_relay.py, test_marks_a_postgres_
    # crash_loses_...). A batch then costs no WAL flush. Every write added to this pool
    # inherits this: one that cannot be redone must commit durably on its own, as the
    # reconciler's republish does (SET LOCAL synchronous_commit = on).
    pool = await create_pool(
        cfg.database_url, max_size=cfg.db_pool_size, durable_commits=False, custom_plans=True
    )
    redis = create_redis(cfg.redis_url)
    # SKIP LOCKED lets several loops of one process drain side by side, like replicas.
    relays = [RelayLoop(pool, redis, cfg, name=f"relay-{i}") for i in range(cfg.concurrency)]

    wakeups = Wakeups(relays)
    listener = Listener(cfg.database_url, wakeups.notify)
    reconciler = Reconciler(
        pool, redis, relays[0].publisher, after_seconds=cfg.reconcile_after_seconds
    )
    maintenance = Maintenance(pool, reconciler, cfg)
    probe = ProbeServer(
        cfg.metrics_host,
        cfg.metrics_port,
        healthy=lambda: listener.running and all(r.running for r in relays),
    )

    async def close(within: float) -> None:
        await redis.aclose()
        await close_pool(pool, within)

    await run_until_signalled(
        [probe, listener, *relays, maintenance], cfg.shutdown_grace_seconds, close
    )


def main() -> None:
    cfg = entrypoint.load_settings("relay", RelaySettings)
    entrypoint.run("relay", cfg.log_level, lambda: serve(cfg))


if __name__ == "__main__":
    main()
