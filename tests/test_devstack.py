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

from devstack.chaos import Chaos
from devstack.procs import free_port, wait_for_port
from tests.helpers import eventually, signup_body


def start(
    data: Path,
    ports: dict[str, int],
    output: int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "SMTP_URL")
    } | (env or {})
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


def _redis_pid(port: int) -> int:
    """The stack's Redis: it names itself "redis-server 127.0.0.1:<port>" in its command
    line once started."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            line = (entry / "cmdline").read_bytes()
            if entry.name.isdigit() and b"redis-server" in line and f":{port}".encode() in line:
                return int(entry.name)
    raise AssertionError(f"no redis-server on port {port}")


def test_the_chaos_drill_tears_everything_down_when_stopped_during_an_smtp_outage(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stopped (Ctrl-C) in the 5 s the SMTP sink refuses connections: stopping the sink
    again raised (aiosmtpd), and the rest of the teardown, Postgres and Redis, did not
    run. The sink's stop is idempotent, and every teardown step runs whatever the one
    before it did."""
    chaos = Chaos(workdir / "chaos", seed=1)
    chaos.pg.start()
    chaos.redis.start()
    chaos.sink.start()
    chaos.sink.refuse_connections()  # the drill's smtp_down, interrupted here
    stopped: list[str] = []
    real_redis_kill = chaos.redis.kill

    def redis_kill_fails() -> None:
        real_redis_kill()
        stopped.append("redis")
        raise RuntimeError("a step that fails")

    chaos.redis.kill = redis_kill_fails  # type: ignore[method-assign]
    try:
        chaos.teardown()
    finally:  # whatever teardown left (it left both, before)
        real_redis_kill()
        pg_left = chaos.pg.proc is not None
        chaos.pg.stop()
    assert not pg_left  # stopped after the step that failed
    assert stopped == ["redis"]
    err = capsys.readouterr().err
    assert "teardown: " in err and "redis_kill_fails" in err  # reported, and only it
    assert "SmtpSink" not in err  # stopping the refusing sink again raised nothing


@pytest.mark.timeout(120)
def test_a_postgres_that_never_gets_ready_is_stopped_too(workdir: Path) -> None:
    """A postmaster that does not accept connections within its 30 s (a long crash
    recovery) failed the start, and was left running in its own session: the next
    `make run` found its port taken."""
    fake = workdir / "fake-pg-bin"
    fake.mkdir()
    pidfile = workdir / "fake-postgres.pid"
    scripts = {
        "postgres": f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 600\n",
        "pg_isready": "#!/bin/sh\nexit 2\n",
    }
    for name, text in scripts.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    workdir.chmod(0o777)  # the fake postmaster runs as `nobody` under root, as Postgres does
    data = workdir / "devstack-pg-never-ready"
    (data / "postgres").mkdir(parents=True)
    (data / "postgres" / "PG_VERSION").write_text("16\n")  # no initdb
    ports = {k: free_port() for k in ("api", "pg", "redis", "smtp", "relay", "worker")}
    proc = start(data, ports, env={"PG_BIN": str(fake)})
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert "postgres not ready after 30s" in out
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists(), "the postmaster was left running"


@pytest.mark.timeout(120)
async def test_the_stack_stops_when_its_redis_dies(workdir: Path) -> None:
    """Redis killed under `make run`: the relay and the worker would log errors for ever
    and signups' emails wait, with nothing said. The supervisor names what died, stops
    the rest and exits 1."""
    data = workdir / "devstack-redis-dies"
    ports = {k: free_port() for k in ("api", "pg", "redis", "smtp", "relay", "worker")}
    proc = start(data, ports)
    try:
        await asyncio.to_thread(wait_for_port, ports["api"], 60)

        async def worker_running() -> bool:  # past its start, which needs Redis
            with contextlib.suppress(aiohttp.ClientError):
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(f"http://127.0.0.1:{ports['worker']}/healthz") as resp,
                ):
                    return resp.status == 200
            return False

        await eventually(worker_running, timeout=30)
        os.kill(_redis_pid(ports["redis"]), signal.SIGKILL)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            stop(proc)
    assert proc.returncode == 1, out[-3000:]
    assert "redis exited with -9; stopping" in out, out[-3000:]
    assert "stopped" in out
    for port in ports.values():
        with pytest.raises(TimeoutError, match="nothing listening"):
            await asyncio.to_thread(wait_for_port, port, 0.2)


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
