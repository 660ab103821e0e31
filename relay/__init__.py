"""The relay: moves outbox rows into the Redis Stream of their queue."""
