-- An envelope's payload and headers are JSON objects: a row holding anything else could
-- never be decoded by a worker. enqueue() refuses such rows from now on; one written before
-- is repaired so that the constraint holds, and given up on if unfinished (its payload
-- kept under "invalid", for an operator to read).
UPDATE outbox SET
    payload = CASE WHEN jsonb_typeof(payload) = 'object' THEN payload
                   ELSE jsonb_build_object('invalid', payload) END,
    headers = CASE WHEN jsonb_typeof(headers) = 'object' THEN headers ELSE '{}'::jsonb END,
    last_error = CASE WHEN completed_at IS NULL AND dead_lettered_at IS NULL
                      THEN 'undecodable: payload or headers not a JSON object (migration 002)'
                      ELSE last_error END,
    dead_lettered_at = CASE WHEN completed_at IS NULL THEN coalesce(dead_lettered_at, now())
                            ELSE dead_lettered_at END
WHERE jsonb_typeof(payload) <> 'object' OR jsonb_typeof(headers) <> 'object';

-- NOT VALID: new rows are checked at once, and the table is not scanned under this
-- statement's exclusive lock, which would hold every signup's INSERT back. The scan runs
-- in migration 004, under a lock that lets rows be written meanwhile.
ALTER TABLE outbox
    ADD CONSTRAINT outbox_payload_is_object CHECK (jsonb_typeof(payload) = 'object') NOT VALID,
    ADD CONSTRAINT outbox_headers_is_object CHECK (jsonb_typeof(headers) = 'object') NOT VALID;
