"""The small exception hierarchy shared by the services."""

from __future__ import annotations


class OutboxError(Exception):
    """Base of this project's errors."""


class ConfigError(OutboxError):
    """A setting is missing or has a bad value; the process exits with the message."""


class EnvelopeError(OutboxError):
    """A stream entry cannot be decoded into an envelope.

    `event_id` is the outbox event it came from when that much could be read, so that the
    row can be marked dead-lettered too (else the reconciler would publish it again).
    """

    def __init__(self, message: str, event_id: str | None = None) -> None:
        super().__init__(message)
        self.event_id = event_id


class TaskError(OutboxError):
    """Base of the errors a task handler raises to steer the worker."""


class PermanentError(TaskError):
    """Do not retry: the task can never succeed (the entry goes to the dead-letter stream)."""


class RetryableError(TaskError):
    """A transient failure: retry after the backoff of the attempt."""
