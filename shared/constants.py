"""Key, stream, group and channel names in one place.

Every Redis key of a queue carries the queue name in braces (a Redis Cluster hash tag), so a
queue's stream, its dead-letter stream and its dedupe keys hash to one slot and can be used
together in one MULTI or Lua script.
"""

from __future__ import annotations

DEFAULT_QUEUE = "default"
CONSUMER_GROUP = "workers"
NOTIFY_CHANNEL = "outbox_new"

# The one field of a stream entry: the JSON envelope (see shared.envelope).
ENVELOPE_FIELD = "e"
ENVELOPE_VERSION = 1

# Consumer name that parks failed entries while they wait out their retry backoff.
RETRY_PARKING_CONSUMER = "__retry__"
# How long an event's dedupe key lives by default: RELAY_DEDUPE_TTL_SECONDS's default, and
# the life of a key a dead letter's replay makes anew.
DEDUPE_TTL_DEFAULT_SECONDS = 86_400

TASK_SEND_VERIFY_EMAIL = "send_verify_email"


def stream_key(queue: str = DEFAULT_QUEUE) -> str:
    return f"outbox:{{{queue}}}:stream"


def dead_letter_key(queue: str = DEFAULT_QUEUE) -> str:
    return f"outbox:{{{queue}}}:dead"


def dedupe_key(event_id: str, queue: str = DEFAULT_QUEUE) -> str:
    return f"outbox:{{{queue}}}:published:{event_id}"


def alone_key(entry_id: str, queue: str = DEFAULT_QUEUE) -> str:
    """Set while an orphan runs alone: if its worker dies then, the entry did it."""
    return f"outbox:{{{queue}}}:alone:{entry_id}"
