"""Settings come from the environment and are validated at start with a clear message."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from pydantic_settings import BaseSettings

from api_service.settings import ApiSettings
from relay.publisher import ONE_BY_ONE_BUDGET_SECONDS
from relay.settings import DEDUPE_TTL_MIN_SECONDS, RelaySettings
from shared import settings
from shared.connections import IDLE_IN_TRANSACTION_SECONDS, WORKER_IDLE_IN_TRANSACTION_SECONDS
from shared.envelope import Envelope
from shared.errors import ConfigError, EnvelopeError
from shared.migrate import MigrateSettings
from tests.helpers import settings_of
from worker_service.app import (
    SEND_TIMEOUT_SECONDS,
    SMTP_TIMEOUT_MAX_SECONDS,
    SMTP_WAITS_UNCUT,
    VerifyEmailSettings,
)
from worker_service.queue import retry_delay
from worker_service.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"DATABASE_URL": "postgresql://u@db:5432/x", "REDIS_URL": "redis://r:6379/0"}
ALL: list[type[BaseSettings]] = [
    ApiSettings,
    RelaySettings,
    WorkerSettings,
    VerifyEmailSettings,
    MigrateSettings,
]


def env_names(cls: type[BaseSettings]) -> list[str]:
    return [f.alias or name.upper() for name, f in cls.model_fields.items()]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL: Value error, must be a URL with scheme"),
        ({"REDIS_URL": "redis://"}, "REDIS_URL: Value error, must name a host"),
        # A password with an unescaped "/": the client libraries' errors quoted a piece of
        # it, in a traceback, and the service exited 1 instead of 2.
        (
            {"DATABASE_URL": "postgresql://signup:hunter2/xyz@db:5432/x"},
            "DATABASE_URL: Value error, its port is not a number",
        ),
        (
            {"REDIS_URL": "redis://default:hunter2/xyz@redis:6379/0"},
            "REDIS_URL: Value error, its port is not a number",
        ),
        (
            {"SHUTDOWN_GRACE_SECONDS": "-1"},
            "SHUTDOWN_GRACE_SECONDS: Input should be greater than 0",
        ),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL: Input should be"),
        ({"WORKER_CONCURRENCY": "many"}, "WORKER_CONCURRENCY: Input should be a valid integer"),
        (
            {"VISIBILITY_TIMEOUT_SECONDS": "inf"},
            "VISIBILITY_TIMEOUT_SECONDS: Input should be a finite",
        ),
        ({"SHUTDOWN_GRACE_SECONDS": "nan"}, "SHUTDOWN_GRACE_SECONDS: Input should be a finite"),
        (
            {"VISIBILITY_TIMEOUT_SECONDS": "1e300"},
            "VISIBILITY_TIMEOUT_SECONDS: Input should be less than or equal to 86400",
        ),
        (
            {"WORKER_RETRY_BACKOFF_BASE_SECONDS": "10", "WORKER_RETRY_BACKOFF_MAX_SECONDS": "1"},
            "WORKER_RETRY_BACKOFF_MAX_SECONDS must be >= the base",
        ),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for k, v in {**GOOD, **env}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings.load(WorkerSettings)


def test_missing_required_values_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(ConfigError) as e:
        settings.load(RelaySettings)
    assert "DATABASE_URL: Field required" in str(e.value)
    assert "REDIS_URL: Field required" in str(e.value)


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs a CPU affinity mask with at least two CPUs to narrow",
)
def test_hash_threads_default_to_the_cpus_the_process_may_use() -> None:
    """In a container limited to one CPU of many (a cpuset), the API must not start one
    argon2 thread (and its hash memory) per host CPU."""
    one_cpu = min(os.sched_getaffinity(0))
    code = (
        f"import os; os.sched_setaffinity(0, {{{one_cpu}}});"
        "from api_service.settings import ApiSettings;"
        "print(ApiSettings(DATABASE_URL='postgresql://h/d').hash_threads)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "1"


@pytest.mark.parametrize(
    ("cgroup", "files", "quota"),
    [
        # cgroup v2, the process's own cgroup (a CPU limit of 1.5: two hash threads)
        ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1/cpu.max": "150000 100000\n"}, 1.5),
        # v2 inside a container's cgroup namespace: its cgroup is the root
        ("0::/\n", {"cpu.max": "50000 100000\n"}, 0.5),
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        # cgroup v1
        (
            "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n",
            {
                "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            },
            2.0,
        ),
        (
            "4:cpu,cpuacct:/\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            None,
        ),
        ("0::/\n", {}, None),  # no cpu controller files: not limited as far as we know
    ],
)
def test_the_cgroup_cpu_quota_is_read_from_v1_and_v2(
    tmp_path: Path, cgroup: str, files: dict[str, str], quota: float | None
) -> None:
    """A container limited to 1.5 CPUs of a 32-CPU node must not start 32 hash threads,
    each holding its hash memory: the default counts the CPU quota too."""
    (tmp_path / "proc_cgroup").write_text(cgroup)
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    assert settings.cgroup_cpu_quota(tmp_path / "proc_cgroup", tmp_path / "fs") == quota


@pytest.mark.parametrize("module", ["api_service", "relay", "worker_service", "shared.migrate"])
def test_services_exit_2_with_a_one_line_message(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module],
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": "nope", "REDIS_URL": "redis://r"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "DATABASE_URL" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("module", ["api_service", "relay", "worker_service", "shared.migrate"])
def test_a_bad_log_level_is_a_configuration_error(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module],
        env={"PATH": "/usr/bin:/bin", **GOOD, "LOG_LEVEL": "LOUD"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert "LOG_LEVEL" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_dedupe_ttl_outlives_a_frozen_relays_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    """Postgres ends a frozen relay's claim transaction after 60 s idle (more in a row-by-row
    pass), and the next relay claims its rows: with their dedupe keys expired by then (the
    bound was 60 s), it published the whole batch a second time."""
    for k, v in GOOD.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RELAY_RECONCILE_AFTER_SECONDS", "30")
    monkeypatch.setenv("RELAY_DEDUPE_TTL_SECONDS", str(DEDUPE_TTL_MIN_SECONDS - 1))
    with pytest.raises(ConfigError, match="RELAY_DEDUPE_TTL_SECONDS"):
        settings.load(RelaySettings)
    monkeypatch.setenv("RELAY_DEDUPE_TTL_SECONDS", str(DEDUPE_TTL_MIN_SECONDS))
    assert settings.load(RelaySettings).dedupe_ttl_seconds == DEDUPE_TTL_MIN_SECONDS
    assert DEDUPE_TTL_MIN_SECONDS > IDLE_IN_TRANSACTION_SECONDS + ONE_BY_ONE_BUDGET_SECONDS + 60


def test_a_check_across_settings_names_its_variables_without_a_placeholder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {**GOOD, "RELAY_DEDUPE_TTL_SECONDS": "600", "RELAY_RECONCILE_AFTER_SECONDS": "900"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        settings.load(RelaySettings)
    assert str(e.value) == (
        "invalid configuration: Value error, RELAY_DEDUPE_TTL_SECONDS must exceed"
        " RELAY_RECONCILE_AFTER_SECONDS"
    )


def test_argon2_memory_below_what_its_lanes_need_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """argon2 needs 8 KiB per lane: the API would start, then fail every signup."""
    for k, v in {**GOOD, "ARGON2_MEMORY_KIB": "8", "ARGON2_PARALLELISM": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match="ARGON2_MEMORY_KIB must be at least 8 x"):
        settings.load(ApiSettings)
    monkeypatch.setenv("ARGON2_MEMORY_KIB", "16")
    assert settings.load(ApiSettings).argon2_memory_kib == 16


def test_a_setting_is_read_from_its_documented_variable_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A field's own name is not a second variable for it: a plain CONCURRENCY or
    MAX_ATTEMPTS in a deployment's environment, set for something else, must not set
    WORKER_CONCURRENCY's or WORKER_MAX_ATTEMPTS's field, nor stop the service."""
    env = {**GOOD, "SMTP_URL": "smtp://mail", "PUBLIC_BASE_URL": "http://x.test"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = {cls: settings.load(cls).model_dump() for cls in ALL}
    plain = {
        name.upper()
        for cls in ALL
        for name, f in cls.model_fields.items()
        if f.alias and f.alias.upper() != name.upper()
    }
    assert {"CONCURRENCY", "MAX_ATTEMPTS", "HASH_THREADS", "BATCH_SIZE"} <= plain
    for name in plain:
        monkeypatch.setenv(name, "7")
    assert {cls: settings.load(cls).model_dump() for cls in ALL} == before


@pytest.mark.parametrize("ttl", ["inf", "1e12", "0"])
def test_a_link_lifetime_postgres_cannot_add_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, ttl: str
) -> None:
    """Started with it, every send would fail in Postgres (interval or timestamp out of
    range) and every email end dead-lettered an hour later."""
    for k, v in {"SMTP_URL": "smtp://mail", "PUBLIC_BASE_URL": "http://x.test"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("VERIFY_EMAIL_TTL_MINUTES", ttl)
    with pytest.raises(ConfigError, match="VERIFY_EMAIL_TTL_MINUTES: Input should be"):
        settings.load(VerifyEmailSettings)


@pytest.mark.parametrize("timeout", ["inf", "101", "0"])
def test_an_smtp_timeout_beyond_the_send_transactions_life_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, timeout: str
) -> None:
    """A send's transaction is idle while the SMTP server answers: up to the handler's
    timeout, and then, once the message is under way, up to SMTP_WAITS_UNCUT replies of
    up to SMTP_TIMEOUT_SECONDS each. Postgres ends a session idle in a transaction after
    WORKER_IDLE_IN_TRANSACTION_SECONDS, which would roll back an email sent."""
    longest_idle = SEND_TIMEOUT_SECONDS + SMTP_WAITS_UNCUT * SMTP_TIMEOUT_MAX_SECONDS
    assert longest_idle < WORKER_IDLE_IN_TRANSACTION_SECONDS
    for k, v in {"SMTP_URL": "smtp://mail", "PUBLIC_BASE_URL": "http://x.test"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SMTP_TIMEOUT_SECONDS", str(SMTP_TIMEOUT_MAX_SECONDS))
    assert settings.load(VerifyEmailSettings).smtp_timeout_seconds == SMTP_TIMEOUT_MAX_SECONDS
    monkeypatch.setenv("SMTP_TIMEOUT_SECONDS", timeout)
    with pytest.raises(ConfigError, match="SMTP_TIMEOUT_SECONDS: Input should be"):
        settings.load(VerifyEmailSettings)


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = sorted({n for cls in ALL for n in env_names(cls) if f"`{n}`" not in readme})
    assert missing == []


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {b"e": b"not json"},
        {b"e": b"[]"},
        {b"e": b'{"v": 2}'},
        {b"e": b'{"v": 1, "id": "zzz", "type": "t", "payload": {}, "created_at": "2026-01-01"}'},
        {
            b"e": b'{"v": 1, "id": "5b8f2f0e-7d8a-4c39-9a55-2f3c3d6f1a10", "type": 5,'
            b' "payload": {}, "created_at": "2026-01-01"}'
        },
        {
            b"e": b'{"v": 1, "id": "5b8f2f0e-7d8a-4c39-9a55-2f3c3d6f1a10", "type": "t",'
            b' "payload": {}, "created_at": "yesterday"}'
        },
    ],
)
def test_envelope_garbage_is_an_envelope_error(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(EnvelopeError):
        Envelope.decode(fields)


@pytest.mark.parametrize(
    "given",
    [
        "5B8F2F0E-7D8A-4C39-9A55-2F3C3D6F1A10",
        "{5b8f2f0e-7d8a-4c39-9a55-2f3c3d6f1a10}",
        "5b8f2f0e7d8a4c399a552f3c3d6f1a10",
        "urn:uuid:5b8f2f0e-7d8a-4c39-9a55-2f3c3d6f1a10",
    ],
)
def test_envelope_event_id_is_normalised(given: str) -> None:
    doc = {"v": 1, "id": given, "type": "t", "payload": {}, "created_at": "2026-01-01T00:00Z"}
    env = Envelope.decode({b"e": orjson.dumps(doc)})
    assert env.event_id == "5b8f2f0e-7d8a-4c39-9a55-2f3c3d6f1a10"


@pytest.mark.parametrize(
    "bad_id", ["5b8f2f0e-7d8a-4c39-9a55-2f3c3d6f1a1", "5b8f2f0e-7d8a-4c39-9a55-2f3c3d6f1a10\n", 7]
)
def test_envelope_bad_event_id_is_an_envelope_error(bad_id: object) -> None:
    doc = {"v": 1, "id": bad_id, "type": "t", "payload": {}, "created_at": "2026-01-01T00:00Z"}
    with pytest.raises(EnvelopeError):
        Envelope.decode({b"e": orjson.dumps(doc)})


def test_envelope_round_trip() -> None:
    from datetime import UTC, datetime

    env = Envelope(
        "5b8f2f0e-7d8a-4c39-9a55-2f3c3d6f1a10",
        "t",
        {"a": [1, "x"]},
        datetime(2026, 1, 1, tzinfo=UTC),
        {"request_id": "r1"},
    )
    assert Envelope.decode({b"e": env.encode()}) == env
    assert env.request_id == "r1"


def test_the_default_retries_outlast_a_half_hour_smtp_outage() -> None:
    """An SMTP server down, or a misconfiguration being fixed, must delay the emails, not
    dead-letter them: with the defaults, the backoff an entry waits in all before its last
    attempt is 29 to 59 minutes (the README's figures), whatever its jitter."""
    s = settings_of(WorkerSettings, database_url="postgresql://db/x", redis_url="redis://r")
    base, cap = s.retry_backoff_base_seconds, s.retry_backoff_max_seconds
    bounds = [min(cap, base * 2 ** (d - 1)) for d in range(1, s.max_attempts)]
    assert sum(bounds) / 2 >= 29 * 60, sum(bounds)
    assert sum(bounds) <= 59 * 60, sum(bounds)
    # The queue's delay for each delivery stays within those bounds.
    for i in range(1, 201):
        for d, top in enumerate(bounds, start=1):
            assert top / 2 <= retry_delay(f"{i}-0", d, base, cap) <= top
