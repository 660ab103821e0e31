"""Apply the numbered SQL migrations in sql/ in order, each once: `python -m shared.migrate`.

Applied versions are recorded in schema_migrations with a checksum of their file; an
advisory lock lets several processes run this at once (the first applies, the others wait
and find nothing to do). A file changed after it was applied stops the run before anything
is applied: the database would not be what the file now says.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import asyncpg
from pydantic import Field
from pydantic_settings import BaseSettings
from tenacity import (
    before_sleep_log,
    retry,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from shared import logs
from shared.entrypoint import config_error, load_settings
from shared.errors import ConfigError
from shared.settings import SETTINGS_CONFIG, PostgresUrl

logger = logging.getLogger(__name__)

_LOCK_KEY = 727_001  # arbitrary, constant: the advisory lock that serialises migrators

# The schema this code needs: the highest migration in sql/ (a test keeps them equal). The
# API is not ready on a database behind it, so that a release whose migrations have not
# run takes no traffic; a database ahead of it (the next release migrated first) is fine.
SCHEMA_VERSION = 5
_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")


class MigrateSettings(BaseSettings):
    """What `python -m shared.migrate` reads (MIGRATIONS_DIR: see migrations_dir())."""

    model_config = SETTINGS_CONFIG

    database_url: PostgresUrl = Field(description="Postgres DSN, the source of truth.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def migrations_dir() -> Path:
    env = os.environ.get("MIGRATIONS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "sql"


class MigrationChanged(ConfigError):
    """An applied migration's file is not what was applied."""


# Files rewritten after their release in a way that leaves a database that applied them
# as the file now says: (the file's checksum now, the checksums it had before, the first
# released first). While the file is that text, an earlier checksum is taken as applied,
# and the first released one is what a run records for it: an earlier release, which may
# run against this database (a rollback), checks it against its own file. 005 gained IF
# NOT EXISTS, so that its index can be built by hand, concurrently, before an upgrade from
# 004 (README, Development); the text of 1d6d099..05276ba, which recorded its own
# checksum, is among the earlier ones.
EQUIVALENT_EARLIER: dict[str, tuple[str, tuple[str, ...]]] = {
    "005_outbox_refused_idx.sql": (
        "f4e00950513bc2bb6d0bc98034f4158f7e7770adfe46bcd490476ad688c90d8a",
        (
            "619b5e0d8dd25725db39dbf681b5f236cbf6ed766374152d4ed4ce4d3d99177d",
            "17ba540d59cd14fc2145ea95325f2f2521d5324fadfc1774a21741f8ea89e17f",
        ),
    ),
}


def _equivalent(name: str, now: str, applied: str | None) -> bool:
    current, earlier = EQUIVALENT_EARLIER.get(name, ("", ()))
    return now == current and applied in earlier


def _recorded(name: str, now: str) -> str:
    """The checksum a run records for a file it applies (see EQUIVALENT_EARLIER)."""
    current, earlier = EQUIVALENT_EARLIER.get(name, ("", ()))
    return earlier[0] if now == current and earlier else now


def checksum(path: Path) -> str:
    """sha256 of the file's text, with line endings normalised (a checkout that turns them
    into CRLF changes no migration)."""
    text = path.read_bytes().replace(b"\r\n", b"\n")
    return hashlib.sha256(text).hexdigest()


def discover(directory: Path) -> list[tuple[int, Path]]:
    """The migrations in `directory`, by version. None at all is a mistake (a wrong
    MIGRATIONS_DIR, an image without sql/): a run that applied nothing would exit 0 and
    leave the API unready with no word why."""
    if not directory.is_dir():
        raise ConfigError(f"no migrations directory at {directory} (MIGRATIONS_DIR)")
    found = []
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise ConfigError(f"migration file name not of the form NNN_name.sql: {path.name}")
        found.append((int(m.group(1)), path))
    if not found:
        raise ConfigError(f"no migrations (NNN_name.sql) in {directory} (MIGRATIONS_DIR)")
    versions = sorted(v for v, _ in found)
    if len(set(versions)) != len(versions):
        raise ConfigError("two migrations share a version number")
    # Numbered 1, 2, 3 ... with none missing: schema_version() counts only those applied
    # with every one before them, so a missing file would keep the API unready for ever.
    for expected, version in enumerate(versions, start=1):
        if version != expected:
            raise ConfigError(
                f"migrations must be numbered from 001 without gaps: {expected:03d} is missing"
                f" (found {version:03d}) in {directory}"
            )
    return sorted(found)  # by version: 1000_x.sql comes after 999_y.sql, not before


# A migration waits at most this long for a lock (an ALTER TABLE behind a long transaction
# would otherwise queue every write to the table behind itself), then rolls back and tries
# again after a pause, up to LOCK_ATTEMPTS times.
LOCK_TIMEOUT_MS = 2_000
COLUMN_LOCK_TIMEOUT_MS = 200  # adding schema_migrations.checksum to an older table
LOCK_ATTEMPTS = 30


# How long a run waits for Postgres to accept connections: deployed beside a Postgres that
# is still starting (compose's healthcheck can pass while the image's setup server runs),
# one refused connection would fail the run, and nothing would start after it.
CONNECT_WITHIN_SECONDS = 60.0


@retry(
    retry=retry_if_exception_type((OSError, asyncpg.CannotConnectNowError)),
    wait=wait_exponential(multiplier=0.1, max=2),
    stop=stop_after_delay(CONNECT_WITHIN_SECONDS),
    before_sleep=before_sleep_log(logger, logging.WARNING),
    reraise=True,
)
async def _connect(dsn: str) -> asyncpg.Connection[Any]:
    return await asyncpg.connect(dsn)


async def schema_version(db: asyncpg.Pool[Any] | asyncpg.Connection[Any]) -> int:
    """The highest migration applied with every one before it; 0 if none ever ran. (A
    database given 1, 2, 3 and 5 is at 3: the highest, 5, would call it ready for code
    that needs 4.)"""
    try:
        applied = {int(r[0]) for r in await db.fetch("SELECT version FROM schema_migrations")}
    except asyncpg.UndefinedTableError:
        return 0
    version = 0
    while version + 1 in applied:
        version += 1
    return version


async def migrate(
    dsn: str,
    directory: Path | None = None,
    *,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    lock_attempts: int = LOCK_ATTEMPTS,
) -> list[int]:
    """Apply pending migrations; return the versions applied now."""
    # Before any connection: a directory with no migrations is a configuration error.
    migrations = discover(directory or migrations_dir())
    conn = await _connect(dsn)
    applied_now: list[int] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now(), checksum text)"
        )
        # A table from before checksums were kept gets the column, under the same short
        # lock waits as a migration (the API's /readyz reads the table): only then, since
        # ALTER TABLE locks the table even when the column is there.
        has_checksum = await conn.fetchval(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'schema_migrations'::regclass"
            " AND attname = 'checksum' AND NOT attisdropped"
        )
        if not has_checksum:
            await _with_lock_timeout(
                conn,
                [("ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text",)],
                # Readers queue behind the ALTER while it waits: shorter than the 2 s a
                # readiness probe gives the query, so a wait never fails a probe.
                min(lock_timeout_ms, COLUMN_LOCK_TIMEOUT_MS),
                lock_attempts,
                {"file": "schema_migrations.checksum"},
            )
        done = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        found = [(v, path, checksum(path)) for v, path in migrations]
        for version, path, sha in found:
            if done.get(version) not in (None, sha) and not _equivalent(
                path.name, sha, done[version]
            ):
                raise MigrationChanged(
                    f"{path.name} was changed after it was applied (sha256 {done[version][:12]}"
                    f" then, {sha[:12]} now): restore it, and put the change in a new migration"
                )
        for version, path, sha in found:
            if version in done and done[version] is None:
                # Applied before checksums were kept: the file as it is now is taken as
                # what was applied.
                await conn.execute(
                    "UPDATE schema_migrations SET checksum = $2 WHERE version = $1",
                    version,
                    _recorded(path.name, sha),
                )
        for version, path, sha in found:
            if version in done:
                continue
            await _with_lock_timeout(
                conn,
                [
                    (path.read_text(),),
                    (
                        "INSERT INTO schema_migrations (version, name, checksum)"
                        " VALUES ($1, $2, $3)",
                        version,
                        path.name,
                        _recorded(path.name, sha),
                    ),
                ],
                lock_timeout_ms,
                lock_attempts,
                {"version": version, "file": path.name},
            )
            logger.info("migration_applied", extra={"version": version, "file": path.name})
            applied_now.append(version)
    finally:
        await conn.close()
    return applied_now


async def _with_lock_timeout(
    conn: asyncpg.Connection[Any],
    statements: list[tuple[Any, ...]],
    lock_timeout_ms: int,
    lock_attempts: int,
    what: dict[str, Any],
) -> None:
    """Run the statements ((sql, *args) each; a file of several statements takes no args)
    in one transaction that waits at most lock_timeout_ms for each lock; when one is not
    granted in time, roll back, pause and try again, up to lock_attempts times."""
    for attempt in range(1, lock_attempts + 1):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
                for sql, *args in statements:
                    await conn.execute(sql, *args)
            return
        except asyncpg.LockNotAvailableError:
            if attempt == lock_attempts:
                raise
            logger.warning("migration_lock_wait", extra={**what, "attempt": attempt})
            await asyncio.sleep(min(5.0, 0.2 * attempt))


def main() -> None:
    cfg = load_settings("migrate", MigrateSettings)
    logs.setup("migrate", cfg.log_level)
    try:
        applied = asyncio.run(migrate(cfg.database_url, migrations_dir()))
    except ConfigError as e:  # a misnamed migration file, or an applied one changed
        config_error("migrate", e)
    logger.info("migrations_done", extra={"applied": applied})


if __name__ == "__main__":
    main()
