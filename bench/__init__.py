"""Benchmarks of the signup pipeline: `python -m bench [--quick]`.

Each stage starts the real services as processes against a durable Postgres and a Redis
started in a temporary folder, and measures every figure next to a baseline taken in the
same run (a bare asyncpg / redis loop, the hash time, the idle memory), so the ratio says
how far the service is from what the machine allows at that moment.
"""
