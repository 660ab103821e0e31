"""A PostgreSQL server as a child process: PyPI's pgserver binaries, or a system install."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import asyncpg

from devstack.procs import free_port, kill9, make_traversable, stop_process

# Postgres refuses to run as root; under root the server runs as this user.
_UNPRIVILEGED = "nobody"


def find_bin_dir() -> Path:
    """PG_BIN, else the binaries PyPI's pgserver ships, else a Debian install."""
    if env := os.environ.get("PG_BIN"):
        return Path(env)
    try:
        import pgserver._commands as pgc

        return Path(pgc.POSTGRES_BIN_PATH)
    except ImportError:
        pass
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        return Path(candidate)
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise RuntimeError("no PostgreSQL binaries: pip install pgserver, or set PG_BIN")


class PostgresServer:
    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        durable: bool = True,
        log: Path | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.durable = durable
        self.settings = settings or {}  # more `-c name=value` for the server
        self.bin = find_bin_dir()
        self.log = log or data_dir.parent / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as_root = os.geteuid() == 0

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _user_kwargs(self) -> dict[str, object]:
        if not self._as_root:
            return {}
        entry = pwd.getpwnam(_UNPRIVILEGED)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        make_traversable(self.data_dir.parent)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            shutil.chown(self.data_dir, _UNPRIVILEGED)
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            **self._user_kwargs(),  # type: ignore[call-overload]
        )

    def start(self, timeout: float = 30) -> None:
        self.init()
        args = [
            str(self.bin / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(self.data_dir),
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=256MB",
        ]
        if not self.durable:
            # Tests only: the data need not survive a crash of the machine (it survives
            # a crash of Postgres either way).
            args += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        if self.log.exists() and self._as_root:
            shutil.chown(self.log, _UNPRIVILEGED)
        log = open(self.log, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=log,
            start_new_session=True,
            **self._user_kwargs(),  # type: ignore[call-overload]
        )
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}); see {self.log}")
            ok = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                check=False,
            )
            if ok.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError(f"postgres not ready after {timeout}s; see {self.log}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT): roll back open transactions, checkpoint, exit."""
        if self.proc is not None:
            import signal

            stop_process(self.proc, signal.SIGINT, timeout=30)
            self.proc = None

    def kill(self) -> None:
        """kill -9 the postmaster: a crash; the next start recovers from the WAL."""
        if self.proc is not None:
            kill9(self.proc)
            # Orphaned backends exit when they notice the postmaster is gone.
            time.sleep(0.5)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _client_args(self) -> list[str]:
        """How a client program (createdb, pg_basebackup) reaches this server."""
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]

    def standby(self, data_dir: Path) -> PostgresServer:
        """A hot standby of this server (pg_basebackup -R), not started: what DATABASE_URL
        may reach after a failover (tests)."""
        make_traversable(data_dir.parent)
        data_dir.mkdir(parents=True, mode=0o700)
        if self._as_root:
            shutil.chown(data_dir, _UNPRIVILEGED)
        subprocess.run(
            [str(self.bin / "pg_basebackup"), "-D", str(data_dir), "-R", *self._client_args()],
            check=True,
            capture_output=True,
            **self._user_kwargs(),  # type: ignore[call-overload]
        )
        return PostgresServer(data_dir, durable=False, log=data_dir.parent / "standby.log")

    def create_database(self, name: str) -> str:
        """Create a database if missing; its DSN."""
        done = subprocess.run(
            [str(self.bin / "createdb"), *self._client_args(), name],
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0 and "already exists" not in done.stderr:
            raise RuntimeError(f"createdb {name} failed: {done.stderr.strip()}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


async def truncate_tables(dsn: str) -> None:
    """Empty the application's tables and restart their ids (tests and the benchmark)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE users, outbox, verify_emails RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
