"""Local servers for `make run` and the tests: Postgres, Redis and an SMTP sink as processes.

Not used in production: there the services get DATABASE_URL, REDIS_URL and SMTP_URL.
"""
