"""The worker: consumes a queue's stream in a consumer group and runs task handlers."""

from worker_service.router import Router, TaskContext

__all__ = ["Router", "TaskContext"]
