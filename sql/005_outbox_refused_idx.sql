-- Rows the relay failed to publish (Redis refused them, or was down), not yet published:
-- each failure moves available_at on, so the backlog's age counts these from created_at
-- (relay/maintenance.py), and this index keeps that lookup small. A row leaves it when it
-- is published (last_error is cleared then). IF NOT EXISTS: built by hand, concurrently,
-- before the upgrade, it is kept (shared.migrate.EQUIVALENT_EARLIER has this file's text
-- from before that clause).
CREATE INDEX IF NOT EXISTS outbox_refused_idx ON outbox (created_at)
    WHERE published_at IS NULL AND last_error IS NOT NULL;
