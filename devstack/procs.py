"""Helpers shared by the local servers: free ports, waiting, stopping process groups."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def proc_memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB, from /proc; (nan, nan) if it is gone."""
    rss = hwm = math.nan
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return rss, hwm
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return rss, hwm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15
) -> int:
    """Signal the process group, wait, SIGKILL after timeout; the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def kill9(proc: subprocess.Popen[bytes]) -> None:
    """kill -9 the process alone (not its group: children of Postgres must see it die)."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def make_traversable(path: Path) -> None:
    """Let an unprivileged server user reach a folder that root created."""
    path.mkdir(parents=True, exist_ok=True)
    for p in [path, *path.parents]:
        if p == Path("/"):
            break
        with contextlib.suppress(PermissionError):
            p.chmod(p.stat().st_mode | 0o005)
