"""The relay's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PUBLISHED = Counter("relay_events_published", "Outbox rows put into a stream.")
REPUBLISHED = Counter(
    "relay_events_republished",
    "Published events that never completed and were missing from Redis, published again.",
)
PURGED = Counter("relay_outbox_rows_purged", "Completed outbox rows deleted after retention.")
ERRORS = Counter("relay_errors", "Relay failures by kind.", ["kind"])
BATCH_SIZE = Histogram(
    "relay_batch_size", "Rows per publish batch.", buckets=(1, 10, 50, 100, 250, 500, 1000, 5000)
)
BATCH_DURATION = Histogram(
    "relay_batch_duration_seconds",
    "Time to claim, publish and mark one batch.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
BACKLOG = Gauge(
    "relay_outbox_backlog", "Unpublished outbox rows (counted up to a cap, see README)."
)
OLDEST_AGE = Gauge(
    "relay_outbox_oldest_unpublished_age_seconds",
    "Longest wait of an unpublished outbox row (0 when none): since it became due, or"
    " since it was created for a row the relay failed to publish.",
)
