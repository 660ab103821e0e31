"""The API's settings (environment variables, validated at start)."""

from __future__ import annotations

from pydantic import Field, model_validator

from shared.constants import DEFAULT_QUEUE
from shared.settings import CommonSettings, QueueName, usable_cpus


class ApiSettings(CommonSettings):
    api_host: str = Field("0.0.0.0", alias="API_HOST")
    api_port: int = Field(8000, ge=0, le=65535, alias="API_PORT")
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024, alias="API_MAX_BODY_BYTES")
    queue: QueueName = Field(
        DEFAULT_QUEUE, description="The queue (stream) verification emails are enqueued into."
    )
    # argon2id parameters. Each hash in flight holds its memory, and one runs per hash
    # thread (one per CPU), so the memory per hash is what the API's RSS budget (100 MB)
    # allows: RSS is about 55 MiB + hash threads x memory. The default is OWASP's 7 MiB
    # setting (t=5) with twice its passes, about 30 ms of one core. OWASP rates its five
    # settings (46 MiB t=1 to 7 MiB t=5) as one defence, after a rule from tobtu.com: a
    # GPU attacker is bound by memory bandwidth, which grows with memory x (3t - 1), and by
    # it 7 MiB at t=10 costs what the previous default, 12 MiB at t=6, did, within 0.5%.
    # Against an attacker bound by memory held over time (memory x memory x passes: an
    # ASIC, or how many guesses fit in a GPU's memory at once) it costs 0.57 of it. What
    # that buys: two 12 MiB hashes at once slowed each other by 5 to 9% on the development
    # machine (likely their 24 MiB against its 32 MiB of L3, shared with other tenants),
    # two 7 MiB ones by under 5%, and the API holds 10 MiB less (README, Performance).
    # Before those, 64 MiB and t=3 (RFC 9106's memory and passes, with p=1) held 184 MiB
    # on 2 CPUs.
    argon2_time_cost: int = Field(10, ge=1, le=20, alias="ARGON2_TIME_COST")
    argon2_memory_kib: int = Field(7_168, ge=8, le=4_194_304, alias="ARGON2_MEMORY_KIB")
    argon2_parallelism: int = Field(1, ge=1, le=64, alias="ARGON2_PARALLELISM")
    hash_threads: int = Field(default_factory=usable_cpus, ge=1, le=256, alias="API_HASH_THREADS")
    # Signups waiting for a hash thread beyond which the API answers 503 at once: at the
    # default hash (about 30 ms) and two threads, 64 is a wait of about 1 s.
    max_waiting_hashes: int = Field(64, ge=0, le=100_000, alias="API_MAX_WAITING_HASHES")
    # POST /v1/verify_email/resend sends a new email at most once per this many seconds
    # per account (the signup counts), so that it cannot flood a mailbox.
    resend_interval_seconds: float = Field(
        60.0, ge=0, le=86_400, alias="API_RESEND_INTERVAL_SECONDS"
    )

    @model_validator(mode="after")
    def _check(self) -> ApiSettings:
        # argon2 refuses less than 8 KiB per lane: every signup would fail with a 500.
        if self.argon2_memory_kib < 8 * self.argon2_parallelism:
            raise ValueError("ARGON2_MEMORY_KIB must be at least 8 x ARGON2_PARALLELISM")
        return self
