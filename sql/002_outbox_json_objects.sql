-- An envelope's payload and headers are JSON objects: a row holding anything else could
-- never be decoded by a worker. (The check scans the outbox under the ALTER's lock; the
-- table holds in-flight and recently completed rows only, see OUTBOX_RETENTION_SECONDS.)
ALTER TABLE outbox
    ADD CONSTRAINT outbox_payload_is_object CHECK (jsonb_typeof(payload) = 'object'),
    ADD CONSTRAINT outbox_headers_is_object CHECK (jsonb_typeof(headers) = 'object');
