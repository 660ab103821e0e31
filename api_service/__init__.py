"""The HTTP API: signup, email verification, health, readiness and metrics."""
