"""Start the three services (and the migrations) as child processes with a given environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from devstack.procs import kill9, stop_process

COMMANDS: dict[str, list[str]] = {
    "migrate": [sys.executable, "-m", "shared.migrate"],
    "api": [sys.executable, "-m", "api_service"],
    "relay": [sys.executable, "-m", "relay"],
    "worker": [sys.executable, "-m", "worker_service", "--app", "worker_service.app:router"],
}


class ServiceProcess:
    """One service process; its output (JSON logs) goes to a file, or to ours if log is None."""

    def __init__(
        self, name: str, env: dict[str, str], log: Path | None, args: list[str] | None = None
    ):
        self.name = name
        self.env = {**os.environ, **env}
        self.log = log
        self.args = args or COMMANDS[name.split("-")[0]]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        if self.log is None:
            # Own session: a Ctrl-C in the terminal reaches the supervisor only, which
            # then stops the services in order.
            self.proc = subprocess.Popen(self.args, env=self.env, start_new_session=True)
            return self
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=out, stderr=out, start_new_session=True
        )
        out.close()
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, as an orchestrator does; the exit code."""
        assert self.proc is not None
        return stop_process(self.proc, timeout=timeout)

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        if self.proc is not None:
            kill9(self.proc)

    def logs(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")
