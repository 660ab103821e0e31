"""`make run`'s supervisor, as a user runs it: everything starts, a signup's email lands in
<data>/mail, Ctrl-C stops everything cleanly, and the data survives a restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from devstack.procs import free_port, wait_for_port
from tests.helpers import eventually, signup_body


def start(data: Path, ports: dict[str, int], output: int | None = None) -> subprocess.Popen[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "SMTP_URL")
    }
    env.update(
        {
            "API_PORT": str(ports["api"]),
            "DEV_PG_PORT": str(ports["pg"]),
            "DEV_REDIS_PORT": str(ports["redis"]),
            "DEV_SMTP_PORT": str(ports["smtp"]),
            "DEV_RELAY_METRICS_PORT": str(ports["relay"]),
            "DEV_WORKER_METRICS_PORT": str(ports["worker"]),
            "ARGON2_TIME_COST": "1",
            "ARGON2_MEMORY_KIB": "1024",
        }
    )
    return subprocess.Popen(
        [sys.executable, "-m", "devstack", "--data", str(data)],
        env=env,
        stdout=subprocess.PIPE if output is None else output,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


@pytest.mark.timeout(240)
async def test_make_run_supervisor(workdir: Path) -> None:
    data = workdir / "devstack-data"
    ports = {k: free_port() for k in ("api", "pg", "redis", "smtp", "relay", "worker")}
    proc = start(data, ports)
    try:
        await asyncio.to_thread(wait_for_port, ports["api"], 60)
        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                f"http://127.0.0.1:{ports['api']}/v1/users", json=signup_body("devstack")
            )
            assert resp.status == 201

        async def mailed() -> bool:
            return bool(list((data / "mail").glob("*.eml")))

        await eventually(mailed, timeout=10)
        (mail,) = list((data / "mail").glob("*.eml"))
        assert f"http://localhost:{ports['api']}/v1/verify_email?" in mail.read_text()
    finally:
        code, out = stop(proc)
    assert code == 0, out[-3000:]
    assert f"API:        http://localhost:{ports['api']}" in out
    assert "stopped" in out
    for port in ports.values():  # every server and service is gone
        with pytest.raises(TimeoutError, match="nothing listening"):
            await asyncio.to_thread(wait_for_port, port, 0.2)
    # Data under the data folder survives: the user is still there after a restart.
    proc = start(data, ports)
    try:
        await asyncio.to_thread(wait_for_port, ports["api"], 60)
        async with aiohttp.ClientSession() as http:
            again = await http.post(
                f"http://127.0.0.1:{ports['api']}/v1/users", json=signup_body("devstack")
            )
            assert again.status == 409
    finally:
        code, out = stop(proc)
    assert code == 0, out[-3000:]


@pytest.mark.timeout(120)
async def test_a_closed_terminal_stops_the_whole_stack(workdir: Path) -> None:
    """SIGHUP (the terminal closed, an ssh session dropped) reaches the supervisor only:
    the servers and services run in sessions of their own, and were left running. Its
    output goes to a terminal that is gone by then (writes fail with EIO), as in life."""
    ports = {k: free_port() for k in ("api", "pg", "redis", "smtp", "relay", "worker")}
    master, slave = pty.openpty()
    proc = start(workdir / "devstack-hup", ports, output=slave)
    os.close(slave)
    # What a terminal does with the output: read it (a full pty would block the writers),
    # from the event loop, so that nothing holds the terminal open once it is closed.
    os.set_blocking(master, False)
    loop = asyncio.get_running_loop()
    loop.add_reader(master, _read_some, master)
    try:
        await asyncio.to_thread(wait_for_port, ports["api"], 60)
    finally:
        loop.remove_reader(master)
        os.close(master)  # the terminal goes away: from now on its writes fail with EIO
        proc.send_signal(signal.SIGHUP)
        try:
            await asyncio.to_thread(proc.wait, 60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
    for port in ports.values():
        with pytest.raises(TimeoutError, match="nothing listening"):
            await asyncio.to_thread(wait_for_port, port, 0.2)


def _read_some(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.read(fd, 65536)


async def test_a_port_already_taken_stops_it_before_anything_starts(workdir: Path) -> None:
    """A stack left running would answer this one's readiness checks, then its services
    would fail to bind one by one: say so at once instead."""
    ports = {k: free_port() for k in ("api", "pg", "redis", "smtp", "relay", "worker")}
    squatter = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", ports["redis"])
    try:
        proc = start(workdir / "devstack-taken", ports)
        out, _ = await asyncio.to_thread(proc.communicate, None, 30)
    finally:
        squatter.close()
    assert proc.returncode == 2, out
    assert f"port in use on 127.0.0.1: {ports['redis']} (DEV_REDIS_PORT)" in out
    assert "starting PostgreSQL" not in out
