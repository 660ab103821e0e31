-- Checks the rows written before migration 002 (which repaired them) against its
-- constraints, in a transaction of its own: VALIDATE takes a SHARE UPDATE EXCLUSIVE lock,
-- so signups and the relay go on writing while the table is scanned.
ALTER TABLE outbox VALIDATE CONSTRAINT outbox_payload_is_object;
ALTER TABLE outbox VALIDATE CONSTRAINT outbox_headers_is_object;
