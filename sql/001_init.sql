-- Users, the transactional outbox, and the worker's verification records.

CREATE TABLE users (
    username          text PRIMARY KEY,
    full_name         text        NOT NULL,
    email             text        NOT NULL,
    hashed_password   text        NOT NULL,
    is_email_verified boolean     NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now()
);
-- Emails are unique regardless of case: Alice@x.org and alice@x.org are one mailbox in practice.
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

CREATE TABLE outbox (
    id               bigserial   PRIMARY KEY,
    event_id         uuid        NOT NULL UNIQUE,
    task_type        text        NOT NULL,
    queue            text        NOT NULL DEFAULT 'default',
    payload          jsonb       NOT NULL,
    headers          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- A row becomes publishable at available_at: room for delayed tasks, and the relay's
    -- per-row backoff when one row cannot be published.
    available_at     timestamptz NOT NULL DEFAULT now(),
    published_at     timestamptz,
    stream_id        text,
    publish_attempts integer     NOT NULL DEFAULT 0,
    last_error       text,
    -- Set by the worker before it acknowledges the stream entry: Postgres, not Redis,
    -- knows whether an event finished.
    completed_at     timestamptz,
    dead_lettered_at timestamptz
);
-- The relay's work queue: only unpublished rows, so the index stays small.
CREATE INDEX outbox_unpublished_idx ON outbox (available_at, id) WHERE published_at IS NULL;
-- The reconciler's view: published, not finished.
CREATE INDEX outbox_in_flight_idx ON outbox (published_at)
    WHERE published_at IS NOT NULL AND completed_at IS NULL AND dead_lettered_at IS NULL;
-- Retention: finished rows by age.
CREATE INDEX outbox_finished_idx ON outbox (completed_at) WHERE completed_at IS NOT NULL;

CREATE TABLE verify_emails (
    id               bigserial   PRIMARY KEY,
    username         text        NOT NULL REFERENCES users (username) ON DELETE CASCADE,
    email            text        NOT NULL,
    secret_code_hash bytea       NOT NULL,
    event_id         uuid        NOT NULL UNIQUE,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    used_at          timestamptz,
    sent_at          timestamptz
);
CREATE INDEX verify_emails_username_idx ON verify_emails (username);
