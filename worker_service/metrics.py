"""The worker's Prometheus metrics. Labels are bounded: task types come from the router."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TASKS = Counter("worker_tasks", "Tasks by type and outcome.", ["task", "outcome"])
HANDLER_DURATION = Histogram(
    "worker_handler_duration_seconds",
    "Handler run time by task type.",
    ["task"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
END_TO_END = Histogram(
    "worker_end_to_end_latency_seconds",
    "From the outbox row's commit to the handler's completion.",
    ["task"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
STREAM_LENGTH = Gauge("worker_stream_length", "Entries in the queue's stream.")
PENDING = Gauge("worker_pending_entries", "Entries delivered and not yet acknowledged.")
OLDEST_PENDING_AGE = Gauge(
    "worker_oldest_pending_age_seconds",
    "Longest a pending entry has gone since it was delivered or renewed, entries parked for"
    " a retry left out (0 when none).",
)
GROUP_LAG = Gauge(
    "worker_group_lag", "Entries not yet delivered to the group (-1: Redis < 7 does not say)."
)
DEAD_LETTERS = Gauge("worker_dead_letters", "Entries in the dead-letter stream.")
CONSUMERS = Gauge("worker_consumers", "Consumers in the group.")
IN_FLIGHT = Gauge("worker_in_flight", "Tasks this process is running now.")
OVERDUE = Gauge(
    "worker_handlers_overdue",
    "Handlers past their timeout, cancelled, that have not given way yet (one that stays"
    " swallows its cancellation: it holds a slot until the worker stops).",
)
ORPHANS = Counter(
    "worker_orphans",
    "Entries taken over from a worker that stopped with no outcome (a crash, a stall past"
    " the visibility timeout, a restart), each run alone.",
)


class TaskMetrics:
    """The labelled children for one task type, looked up once (labels() takes a lock and
    a dict lookup per call, which shows in the profile at thousands of tasks a second)."""

    __slots__ = ("dead_lettered", "done", "duration", "end_to_end", "retried")

    def __init__(self, task: str) -> None:
        self.done = TASKS.labels(task, "done")
        self.retried = TASKS.labels(task, "retried")
        self.dead_lettered = TASKS.labels(task, "dead_lettered")
        self.duration = HANDLER_DURATION.labels(task)
        self.end_to_end = END_TO_END.labels(task)


_BY_TASK: dict[str, TaskMetrics] = {}


def for_task(task: str) -> TaskMetrics:
    m = _BY_TASK.get(task)
    if m is None:
        m = _BY_TASK[task] = TaskMetrics(task)
    return m
