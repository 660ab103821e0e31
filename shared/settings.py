"""Typed settings read from the environment (12-factor), validated at start.

Each service has its own subclass; `load(SettingsClass)` turns a validation failure into a
ConfigError that names the environment variable and why its value is refused.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask (a container's cpuset), not every
    CPU the host has, which is what os.cpu_count() says before 3.13; and no more than its
    cgroup's CPU quota (`docker run --cpus`, a Kubernetes CPU limit), rounded up, which no
    os function reads."""
    has_mask = hasattr(os, "sched_getaffinity")
    cpus = len(os.sched_getaffinity(0)) if has_mask else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def cgroup_cpu_quota(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> float | None:
    """CPUs' worth of time this process's cgroup may use, or None when unlimited or not
    known (no cgroup file system, as outside Linux)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        try:
            if hierarchy == "0" and not controllers:  # cgroup v2
                # Inside a container's cgroup namespace the path is "/" and root is its own.
                for candidate in (root / rel / "cpu.max", root / "cpu.max"):
                    if candidate.exists():
                        quota, period = candidate.read_text().split()[:2]
                        return None if quota == "max" else int(quota) / int(period)
            elif "cpu" in controllers.split(","):  # cgroup v1
                for base in (root / controllers / rel, root / controllers, root / "cpu"):
                    if (base / "cpu.cfs_quota_us").exists():
                        quota_us = int((base / "cpu.cfs_quota_us").read_text())
                        period_us = int((base / "cpu.cfs_period_us").read_text())
                        return None if quota_us <= 0 else quota_us / period_us
        except (OSError, ValueError):
            return None
    return None


def _url_with_scheme(*schemes: str) -> AfterValidator:
    def check(value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in schemes:
            raise ValueError(f"must be a URL with scheme {' or '.join(schemes)}")
        if parts.scheme not in ("unix", "redis+unix") and not parts.hostname:
            raise ValueError("must name a host")
        try:
            parts.port  # noqa: B018 - read for its check
        except ValueError:
            # Most often a password with "/", "?" or "#" in it, which ends the host part
            # early: the rest of the password is then read as the port. The message quotes
            # nothing of the value (it holds the password); the client libraries' own
            # errors would, in a traceback.
            raise ValueError(
                "its port is not a number between 0 and 65535; a password with '/', '?',"
                " '#' or '@' in it must be percent-encoded (%2F, %3F, %23, %40)"
            ) from None
        return value

    return AfterValidator(check)


PostgresUrl = Annotated[str, _url_with_scheme("postgresql", "postgres")]
RedisUrl = Annotated[str, _url_with_scheme("redis", "rediss", "unix")]
SmtpUrl = Annotated[str, _url_with_scheme("smtp", "smtps")]
HttpUrl = Annotated[str, _url_with_scheme("http", "https")]
# A queue's name goes into its stream's key (outbox:{name}).
QueueName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


# What every settings class of the project is built with (the services', the email
# handler's, outboxctl's, migrate's). Each setting is read from one environment variable,
# its alias where it has one (`WORKER_CONCURRENCY`), else its name in capitals: no class
# turns on `populate_by_name`, with which pydantic-settings would read the field's own
# name as well, and a plain CONCURRENCY or MAX_ATTEMPTS that a deployment sets for
# something else would change the setting or stop the service. No "inf" or "nan" for a
# number: SHUTDOWN_GRACE_SECONDS=inf would pass `gt=0` and break later, where the value is
# turned into an integer or a Postgres interval.
SETTINGS_CONFIG = SettingsConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class CommonSettings(BaseSettings):
    """Settings every service reads."""

    model_config = SETTINGS_CONFIG

    database_url: PostgresUrl = Field(description="Postgres DSN, the source of truth.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_grace_seconds: float = Field(
        10.0, gt=0, le=600, description="How long in-flight work may finish after SIGTERM."
    )
    db_pool_size: int = Field(10, ge=1, le=200)


class StreamSettings(CommonSettings):
    """Settings of the services that talk to Redis: the relay and the worker (the API only
    writes to Postgres)."""

    redis_url: RedisUrl = Field(description="Redis URL carrying the streams.")


SettingsT = TypeVar("SettingsT", bound=BaseSettings)

# Upper bounds of the durations settings take: each is turned into an integer (Redis's
# milliseconds) or a Postgres interval somewhere, where 1e300 seconds overflows.
HOUR = 3600
DAY = 24 * HOUR
YEAR = 365 * DAY


def load(cls: type[SettingsT]) -> SettingsT:
    """Build settings from the environment or raise ConfigError with one line per problem."""
    try:
        return cls()
    except ValidationError as e:
        problems = []
        for err in e.errors():
            name = "_".join(str(p) for p in err["loc"]).upper()
            # A check across fields (a model validator) has no location: its message
            # names the variables itself.
            problems.append(f"{name}: {err['msg']}" if name else err["msg"])
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
