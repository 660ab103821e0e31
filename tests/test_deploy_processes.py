"""compose.yaml, run without containers: each app service's command, with the environment
compose gives it, as a process on this machine (service hosts mapped to local servers, a
container port to a free local port); and a real Prometheus scraping every replica with
the repository's scrape configuration adapted to local ports."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
import yaml

from devstack.postgres import PostgresServer
from devstack.procs import free_port, stop_process, wait_for_port
from devstack.redis import RedisServer
from devstack.services import ServiceProcess
from devstack.smtp_sink import SmtpSink
from tests.helpers import eventually, signup_body, verify_link

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ${NAME:-default} with an empty environment: the defaults."""
    return _VAR.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)


def remap(url: str, hosts: dict[str, int]) -> str:
    """postgresql://u:p@postgres:5432/db -> the same URL at 127.0.0.1:<local port>."""
    parts = urlsplit(url)
    if parts.hostname not in hosts:
        return url
    auth = parts.netloc.rpartition("@")[0]
    netloc = (
        f"{auth}@127.0.0.1:{hosts[parts.hostname]}"
        if auth
        else f"127.0.0.1:{hosts[parts.hostname]}"
    )
    return urlunsplit(parts._replace(netloc=netloc))


def service_env(name: str, hosts: dict[str, int], ports: dict[str, int]) -> dict[str, str]:
    env = {
        k: interpolate(str(v)) for k, v in COMPOSE["services"][name].get("environment", {}).items()
    }
    for key in ("DATABASE_URL", "REDIS_URL", "SMTP_URL"):
        if key in env:
            env[key] = remap(env[key], hosts)
    # The container port, published on a free host port (what a port mapping does).
    for key in ("API_PORT", "METRICS_PORT"):
        if key in env:
            env[key] = str(
                ports[f"{name}:{env[key]}"]
                if f"{name}:{env[key]}" in ports
                else ports.setdefault(f"{name}:{env[key]}", free_port())
            )
    env["ARGON2_TIME_COST"] = "1"  # tests only: cheap hashing
    env["ARGON2_MEMORY_KIB"] = "1024"
    return env


def command(name: str) -> list[str]:
    cmd = [interpolate(str(c)) for c in COMPOSE["services"][name]["command"]]
    assert cmd[0] == "python"
    return [sys.executable, *cmd[1:]]


async def _compose_database(pg: PostgresServer) -> None:
    """The role and database compose's postgres service creates from its environment."""
    creds = {
        k: interpolate(str(v)) for k, v in COMPOSE["services"]["postgres"]["environment"].items()
    }
    conn = await asyncpg.connect(pg.dsn)
    try:
        user, password, db = (
            creds["POSTGRES_USER"],
            creds["POSTGRES_PASSWORD"],
            creds["POSTGRES_DB"],
        )
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", user):
            await conn.execute(f"CREATE ROLE \"{user}\" LOGIN PASSWORD '{password}'")
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", db):
            await conn.execute(f'CREATE DATABASE "{db}" OWNER "{user}"')
    finally:
        await conn.close()


@pytest.fixture
async def compose_stack(
    clean: None,
    pg_server: PostgresServer,
    redis_server: RedisServer,
    smtp_sink: SmtpSink,
    workdir: Path,
) -> AsyncIterator[dict[str, Any]]:
    await _compose_database(pg_server)
    smtp_port = smtp_sink.port
    hosts = {"postgres": pg_server.port, "redis": redis_server.port, "mailpit": smtp_port}
    ports: dict[str, int] = {}
    logs = workdir / "compose-logs"
    migrate = subprocess.run(
        command("migrate"),
        env={**os.environ, **service_env("migrate", hosts, ports)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stderr
    procs: dict[str, ServiceProcess] = {}
    # Two replicas of relay and worker, as `--scale relay=2 --scale worker=2` runs them.
    for name, replicas in (("api", 1), ("relay", 2), ("worker", 2)):
        for i in range(replicas):
            replica_ports = dict(ports) if i == 0 else {}
            env = service_env(name, hosts, replica_ports)
            ports.update({f"{k}#{i}": v for k, v in replica_ports.items()})
            procs[f"{name}-{i}"] = ServiceProcess(
                f"{name}-{i}", env, logs / f"{name}-{i}.log", command(name)
            ).start()
    targets: dict[str, int] = {}
    for key, proc in procs.items():
        port = int(proc.env.get("API_PORT") or proc.env["METRICS_PORT"])
        targets[key] = port
        wait_for_port(port, 30, proc.proc)
    try:
        yield {"procs": procs, "targets": targets, "hosts": hosts}
    finally:
        for key, proc in procs.items():
            grace = COMPOSE["services"][key.split("-")[0]]["stop_grace_period"]
            code = proc.terminate(timeout=float(grace.rstrip("s")))
            assert code == 0, f"{key} did not stop cleanly within {grace}:\n{proc.logs()[-2000:]}"


async def test_compose_services_run_as_processes(
    compose_stack: dict[str, Any], smtp_sink: SmtpSink, pg_server: PostgresServer
) -> None:
    procs, targets = compose_stack["procs"], compose_stack["targets"]
    # Every service's own compose healthcheck passes.
    for key, proc in procs.items():
        test = COMPOSE["services"][key.split("-")[0]]["healthcheck"]["test"]
        assert test[0] == "CMD"
        hc = [sys.executable, *test[2:]] if test[1] == "python" else test[1:]
        out = await asyncio.to_thread(
            subprocess.run,
            hc,
            env=proc.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, f"{key} healthcheck: {out.stderr}"
    api = f"http://127.0.0.1:{targets['api-0']}"
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{api}/v1/users", json=signup_body("compose"))
        assert resp.status == 201

        async def mailed() -> bool:
            return len(smtp_sink.messages()) == 1

        await eventually(mailed, timeout=15)
        link = verify_link(smtp_sink.messages()[0])
        # PUBLIC_BASE_URL is the compose default; the API itself listens on the mapped port.
        assert link.startswith(interpolate("${PUBLIC_BASE_URL:-http://localhost:8000}"))
        local = api + link[link.index("/v1/") :]
        assert (await http.get(local)).status == 200
        for key, port in targets.items():
            body = await (await http.get(f"http://127.0.0.1:{port}/metrics")).read()
            if PROMTOOL:
                check = subprocess.run(
                    [PROMTOOL, "check", "metrics"],
                    input=body,
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
                problems = (check.stdout + check.stderr).decode()
                assert check.returncode == 0, f"{key}: {problems}"
    # The data went to compose's database, as compose's user.
    owner_dsn = remap(
        interpolate(str(COMPOSE["x-common-env"]["DATABASE_URL"])), compose_stack["hosts"]
    )
    conn = await asyncpg.connect(owner_dsn)
    try:
        assert (
            await conn.fetchval("SELECT count(*) FROM users WHERE username = 'user_compose'") == 1
        )
    finally:
        await conn.close()


@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)"
)
async def test_prometheus_scrapes_every_replica(
    compose_stack: dict[str, Any], smtp_sink: SmtpSink
) -> None:
    assert PROMETHEUS is not None
    targets = compose_stack["targets"]
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["scrape_timeout"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    for job in config["scrape_configs"]:
        name = job["job_name"]
        if "dns_sd_configs" in job:
            # What DNS service discovery finds in compose: one target per replica.
            del job["dns_sd_configs"]
            job["static_configs"] = [
                {"targets": [f"127.0.0.1:{p}" for k, p in targets.items() if k.startswith(name)]}
            ]
    prom_port = free_port()
    for job in config["scrape_configs"]:
        if job["job_name"] == "prometheus":
            job["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        shutil.copy(ROOT / "deploy/prometheus/alerts.yml", Path(tmp) / "alerts.yml")
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={tmp}/data",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(Path(tmp) / "prom.log", "wb"),  # noqa: SIM115
            start_new_session=True,
        )
        try:
            try:
                wait_for_port(prom_port, 30, proc)
            except RuntimeError as e:
                raise RuntimeError(f"{e}: {(Path(tmp) / 'prom.log').read_text()[-2000:]}") from e
            base = f"http://127.0.0.1:{prom_port}/api/v1"
            async with aiohttp.ClientSession() as http:

                async def ready() -> bool:
                    # The port opens before the TSDB is loaded; until then the API says 503.
                    async with http.get(f"http://127.0.0.1:{prom_port}/-/ready") as resp:
                        return resp.status == 200

                await eventually(ready, timeout=30, interval=0.2)
                await http.post(
                    f"http://127.0.0.1:{targets['api-0']}/v1/users", json=signup_body("prom")
                )

                async def all_up() -> bool:
                    data = await (await http.get(f"{base}/targets")).json()
                    active = data["data"]["activeTargets"]
                    return len(active) == len(targets) + 1 and all(
                        t["health"] == "up" for t in active
                    )

                await eventually(all_up, timeout=30, interval=0.5)
                wanted = [
                    "api_http_requests_total",
                    "api_signups_total",
                    "relay_events_published_total",
                    "relay_outbox_backlog",
                    "relay_outbox_oldest_unpublished_age_seconds",
                    "worker_tasks_total",
                    "worker_end_to_end_latency_seconds_bucket",
                    "worker_stream_length",
                    "worker_pending_entries",
                    "worker_dead_letters",
                ]

                async def series_exist() -> bool:
                    for metric in wanted:
                        data = await (
                            await http.get(f"{base}/query", params={"query": metric})
                        ).json()
                        if not data["data"]["result"]:
                            return False
                    return True

                await eventually(series_exist, timeout=30, interval=0.5)
                jobs = await (
                    await http.get(f"{base}/query", params={"query": "count by (job) (up)"})
                ).json()
                per_job = {r["metric"]["job"]: int(r["value"][1]) for r in jobs["data"]["result"]}
                assert per_job == {"api": 1, "relay": 2, "worker": 2, "prometheus": 1}
                rules = await (await http.get(f"{base}/rules")).json()
                assert sum(len(g["rules"]) for g in rules["data"]["groups"]) >= 5
        finally:
            stop_process(proc)
