"""The worker's settings (environment variables, validated at start)."""

from __future__ import annotations

import os
import socket

from pydantic import Field, model_validator

from shared.constants import DEFAULT_QUEUE
from shared.settings import DAY, HOUR, YEAR, QueueName, StreamSettings


def default_consumer_name() -> str:
    # Unique per process, and stable across restarts of one container (a fresh PID
    # namespace gives it the same pid each time, under compose's init as without), so that
    # a restarted worker re-reads its own pending entries first.
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(StreamSettings):
    queue: QueueName = Field(DEFAULT_QUEUE, description="The queue (stream) this worker consumes.")
    consumer_name: str = Field(default_factory=default_consumer_name, alias="WORKER_CONSUMER_NAME")
    concurrency: int = Field(64, ge=1, le=10_000, alias="WORKER_CONCURRENCY")
    read_count: int = Field(500, ge=1, le=10_000, alias="WORKER_READ_COUNT")
    block_ms: int = Field(1000, ge=1, le=60_000, alias="WORKER_BLOCK_MS")
    max_attempts: int = Field(20, ge=1, le=1000, alias="WORKER_MAX_ATTEMPTS")
    # An entry that takes its worker down (a crash, the OOM killer, a stalled loop) never
    # reaches the attempts check; past this many deliveries, the last of them run alone
    # with no outcome, it is dead-lettered instead of run again (the lower of this and the
    # attempts applies). Apart from max_attempts, whose default is there to outlast an SMTP
    # outage: 20 crashes in a row would be 20 worker restarts.
    max_crash_deliveries: int = Field(3, ge=1, le=1000, alias="WORKER_MAX_CRASH_DELIVERIES")
    retry_backoff_base_seconds: float = Field(
        1.0, gt=0, le=HOUR, alias="WORKER_RETRY_BACKOFF_BASE_SECONDS"
    )
    retry_backoff_max_seconds: float = Field(
        300.0, gt=0, le=DAY, alias="WORKER_RETRY_BACKOFF_MAX_SECONDS"
    )
    task_timeout_seconds: float = Field(60.0, gt=0, le=DAY, alias="WORKER_TASK_TIMEOUT_SECONDS")
    visibility_timeout_seconds: float = Field(
        30.0, gt=0, le=DAY, alias="VISIBILITY_TIMEOUT_SECONDS"
    )
    reclaim_interval_seconds: float = Field(
        1.0, gt=0, le=HOUR, alias="WORKER_RECLAIM_INTERVAL_SECONDS"
    )
    maintenance_interval_seconds: float = Field(
        5.0, gt=0, le=HOUR, alias="WORKER_MAINTENANCE_INTERVAL_SECONDS"
    )
    consumer_idle_cleanup_seconds: float = Field(
        3600.0, gt=0, le=YEAR, alias="WORKER_CONSUMER_IDLE_CLEANUP_SECONDS"
    )
    metrics_host: str = Field("0.0.0.0", alias="METRICS_HOST")
    metrics_port: int = Field(9102, ge=0, le=65535, alias="METRICS_PORT")

    @model_validator(mode="after")
    def _check(self) -> WorkerSettings:
        if self.retry_backoff_max_seconds < self.retry_backoff_base_seconds:
            raise ValueError("WORKER_RETRY_BACKOFF_MAX_SECONDS must be >= the base")
        if self.consumer_name.startswith("__"):
            raise ValueError("WORKER_CONSUMER_NAME must not start with '__' (reserved)")
        return self

    @property
    def heartbeat_interval(self) -> float:
        """Claims are renewed three times per visibility timeout."""
        return self.visibility_timeout_seconds / 3
