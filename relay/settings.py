"""The relay's settings (environment variables, validated at start)."""

from __future__ import annotations

from pydantic import Field, model_validator

from shared.constants import DEDUPE_TTL_DEFAULT_SECONDS
from shared.settings import HOUR, YEAR, StreamSettings

DEDUPE_TTL_MIN_SECONDS = 600


class RelaySettings(StreamSettings):
    batch_size: int = Field(1000, ge=1, le=10_000, alias="RELAY_BATCH_SIZE")
    concurrency: int = Field(
        2,
        ge=1,
        le=32,
        alias="RELAY_CONCURRENCY",
        description="Batches in flight per process: one's Postgres work overlaps another's Redis.",
    )
    poll_interval_seconds: float = Field(
        1.0,
        gt=0,
        le=300,
        alias="RELAY_POLL_INTERVAL_SECONDS",
        description="Fallback poll when no NOTIFY arrives (NOTIFYs are lost while disconnected).",
    )
    # At least DEDUPE_TTL_MIN_SECONDS: a key must outlive the claim transaction of a relay
    # frozen after its XADDs (SIGSTOP, a paused VM, a partition). Postgres ends that
    # transaction after IDLE_IN_TRANSACTION_SECONDS (60 s) without a statement, which the
    # row-by-row pass restarts for up to ONE_BY_ONE_BUDGET_SECONDS and a Redis timeout or
    # two; then the next relay claims the rows, and with their keys gone it would XADD the
    # whole batch a second time.
    dedupe_ttl_seconds: int = Field(
        DEDUPE_TTL_DEFAULT_SECONDS,
        ge=DEDUPE_TTL_MIN_SECONDS,
        le=YEAR,
        alias="RELAY_DEDUPE_TTL_SECONDS",
        description="How long Redis remembers that an event was published.",
    )
    reconcile_after_seconds: float = Field(
        60.0,
        gt=0,
        le=YEAR,
        alias="RELAY_RECONCILE_AFTER_SECONDS",
        description="Age after which a published, unfinished event is checked for in Redis.",
    )
    retention_seconds: float = Field(
        86_400.0,
        ge=0,
        le=10 * YEAR,
        alias="OUTBOX_RETENTION_SECONDS",
        description="How long completed outbox rows are kept before they are purged.",
    )
    maintenance_interval_seconds: float = Field(
        5.0, gt=0, le=HOUR, alias="RELAY_MAINTENANCE_INTERVAL_SECONDS"
    )
    metrics_host: str = Field("0.0.0.0", alias="METRICS_HOST")
    metrics_port: int = Field(9101, ge=0, le=65535, alias="METRICS_PORT")

    @model_validator(mode="after")
    def _dedupe_outlives_reconcile(self) -> RelaySettings:
        if self.dedupe_ttl_seconds <= self.reconcile_after_seconds:
            raise ValueError("RELAY_DEDUPE_TTL_SECONDS must exceed RELAY_RECONCILE_AFTER_SECONDS")
        return self
