-- When this user last asked for a verification email (the signup, then each resend):
-- POST /v1/verify_email/resend sends a new one only once API_RESEND_INTERVAL_SECONDS have
-- passed since, so the endpoint cannot be used to flood a mailbox.
ALTER TABLE users ADD COLUMN verify_requested_at timestamptz NOT NULL DEFAULT now();
