-- Rows the relay failed to publish (Redis refused them, or was down), not yet published:
-- each failure moves available_at on, so the backlog's age counts these from created_at
-- (relay/maintenance.py), and this index keeps that lookup small. A row leaves it when it
-- is published (last_error is cleared then).
--
-- IF NOT EXISTS: an index built by hand, concurrently, before the upgrade is kept. One
-- such build that failed or was cut off leaves an invalid index of this name, which is
-- dropped and built again here. (shared.migrate.EQUIVALENT_EARLIER takes this file's text
-- from before those lines as applied.)
-- The lock first: a concurrent build still under way holds one that conflicts with it, so
-- the check below sees the index as that build leaves it, not one about to become valid.
LOCK TABLE outbox IN SHARE UPDATE EXCLUSIVE MODE;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index
               WHERE indexrelid = to_regclass('outbox_refused_idx') AND NOT indisvalid) THEN
        DROP INDEX outbox_refused_idx;
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS outbox_refused_idx ON outbox (created_at)
    WHERE published_at IS NULL AND last_error IS NOT NULL;
