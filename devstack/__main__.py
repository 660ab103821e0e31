"""`python -m devstack` (what `make run` calls): the whole stack on this machine.

Starts Postgres, Redis and an SMTP sink unless DATABASE_URL, REDIS_URL or SMTP_URL point
at servers already, applies the migrations, then runs the API, the relay and the worker
as separate processes. Ctrl-C (or SIGTERM, or SIGHUP: the terminal closed) stops the
services gracefully, then the servers. Data lives under .data/ and survives a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from devstack.postgres import PostgresServer
from devstack.procs import make_traversable
from devstack.redis import RedisServer
from devstack.services import ServiceProcess
from devstack.smtp_sink import SmtpSink
from shared.migrate import migrate


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _say(*args: object, **kwargs: Any) -> None:
    """print(), which must not stop the shutdown: after a hangup, writing to the closed
    terminal fails (EIO), and the servers would be left running."""
    with contextlib.suppress(OSError):
        print(*args, **kwargs)


def _in_use(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(".data"), help="default: .data")
    args = parser.parse_args(argv)
    data: Path = args.data.resolve()
    make_traversable(data)
    servers: list[PostgresServer | RedisServer | SmtpSink] = []
    services: list[ServiceProcess] = []
    stop = {"now": False}
    failed = False

    def on_signal(*_: object) -> None:
        stop["now"] = True

    # The services run in sessions of their own (a Ctrl-C reaches this supervisor only,
    # which stops them in order): a closed terminal's SIGHUP must stop them too.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    env = dict(os.environ)
    ports = {
        "API_PORT": _port("API_PORT", 8000),
        "DEV_RELAY_METRICS_PORT": _port("DEV_RELAY_METRICS_PORT", 9101),
        "DEV_WORKER_METRICS_PORT": _port("DEV_WORKER_METRICS_PORT", 9102),
    }
    for url, name, default in (
        ("DATABASE_URL", "DEV_PG_PORT", 55432),
        ("REDIS_URL", "DEV_REDIS_PORT", 56379),
        ("SMTP_URL", "DEV_SMTP_PORT", 2525),
    ):
        if url not in env:
            ports[name] = _port(name, default)
    # A stack left running (its terminal killed with it, say) would answer this one's
    # readiness checks, and its services would then fail to bind, one by one.
    taken = [f"{port} ({name})" for name, port in ports.items() if _in_use(port)]
    if taken:
        _say(
            f"port in use on 127.0.0.1: {', '.join(taken)}. Is another `make run` still"
            " running? Stop it, or choose other ports with these variables.",
            file=sys.stderr,
        )
        return 2
    try:
        if "DATABASE_URL" not in env:
            pg = PostgresServer(data / "postgres", ports["DEV_PG_PORT"], log=data / "postgres.log")
            _say(f"starting PostgreSQL on 127.0.0.1:{pg.port} (data in {pg.data_dir})", flush=True)
            servers.append(pg)  # before its start: one that never got ready is stopped too
            pg.start()
            env["DATABASE_URL"] = pg.create_database("signup")
        if "REDIS_URL" not in env:
            rs = RedisServer(data / "redis", ports["DEV_REDIS_PORT"], log=data / "redis.log")
            _say(
                f"starting Redis on 127.0.0.1:{rs.port} (append-only file in {rs.data_dir})",
                flush=True,
            )
            servers.append(rs)
            rs.start()
            env["REDIS_URL"] = rs.url
        if "SMTP_URL" not in env:
            sink = SmtpSink(data / "mail", ports["DEV_SMTP_PORT"])
            sink.start()
            servers.append(sink)
            env["SMTP_URL"] = sink.url
        api_port = ports["API_PORT"]
        env["API_PORT"] = str(api_port)
        env.setdefault("API_HOST", "127.0.0.1")
        env.setdefault("PUBLIC_BASE_URL", f"http://localhost:{api_port}")
        env.setdefault("METRICS_HOST", "127.0.0.1")
        asyncio.run(migrate(env["DATABASE_URL"]))
        metrics_ports = {
            name: str(ports[f"DEV_{name.upper()}_METRICS_PORT"]) for name in ("relay", "worker")
        }
        for name in ("api", "relay", "worker"):
            child_env = dict(env)
            if name in metrics_ports:
                child_env["METRICS_PORT"] = metrics_ports[name]
            services.append(ServiceProcess(name, child_env, None).start())
        _say(
            "\n"
            f"  API:        http://localhost:{api_port}   (OpenAPI at /openapi.json)\n"
            f"  Mail:       {data / 'mail'}/*.eml\n"
            f"  Metrics:    http://localhost:{api_port}/metrics,"
            f" http://localhost:{metrics_ports['relay']}/metrics,"
            f" http://localhost:{metrics_ports['worker']}/metrics\n"
            "  Stop:       Ctrl-C\n",
            flush=True,
        )
        while not stop["now"]:
            gone = _exited(services, servers)
            if gone:
                _say(f"{gone}; stopping", file=sys.stderr, flush=True)
                failed = True
                break
            time.sleep(0.2)
    finally:
        _say("stopping services...", flush=True)
        for svc in reversed(services):
            # -SIGTERM: the signal came before the service had set its handlers, while it
            # was still starting, with nothing in flight.
            if svc.alive and (code := svc.terminate()) not in (0, -signal.SIGTERM):
                _say(f"{svc.name} exited with {code} while stopping", file=sys.stderr, flush=True)
                failed = True
        for server in reversed(servers):
            server.stop()
        _say("stopped", flush=True)
    return 1 if failed else 0


def _exited(
    services: list[ServiceProcess], servers: list[PostgresServer | RedisServer | SmtpSink]
) -> str | None:
    """What has exited of the stack (a service, or Postgres or Redis killed), if anything:
    the others cannot do their work without it, and would log errors for ever."""
    for svc in services:
        if not svc.alive:
            return f"{svc.name} exited with {svc.proc and svc.proc.returncode}"
    for server in servers:
        proc = getattr(server, "proc", None)
        if proc is not None and proc.poll() is not None:
            name = "postgres" if isinstance(server, PostgresServer) else "redis"
            return f"{name} exited with {proc.returncode}"
    return None


if __name__ == "__main__":
    raise SystemExit(main())
