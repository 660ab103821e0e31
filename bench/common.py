"""What every stage shares: the servers, service processes, progress lines, figures."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg
import redis.asyncio as aioredis

from devstack.postgres import PostgresServer, truncate_tables
from devstack.procs import free_port, make_traversable, proc_memory
from devstack.redis import RedisServer
from devstack.services import ServiceProcess
from shared.migrate import migrate

REPO = Path(__file__).resolve().parent.parent
_T0 = time.monotonic()

MB = 1024 * 1024


def log(msg: str) -> None:
    """A progress line on stderr, with the seconds since the bench started."""
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


Op = Literal[">=", "<=", "<", ">"]


@dataclass
class Figure:
    """One line of the table: a measured value next to its baseline and its target."""

    stage: str
    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    target_op: Op | None = None
    target: float | None = None
    target_on: Literal["value", "ratio"] = "value"
    target_label: str = ""
    note: str = ""
    ok: bool | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.ok = self._check()

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.baseline is None or self.baseline == 0:
            return None
        if math.isnan(self.value) or math.isnan(self.baseline):
            return None
        return self.value / self.baseline

    def _check(self) -> bool | None:
        if self.target_op is None or self.target is None:
            return None
        got = self.ratio if self.target_on == "ratio" else self.value
        if got is None or math.isnan(got):
            return False
        return {
            ">=": got >= self.target,
            "<=": got <= self.target,
            "<": got < self.target,
            ">": got > self.target,
        }[self.target_op]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


@dataclass
class StageResult:
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


# -- processes ---------------------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()  # fields from "state" on


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0 if it is gone."""
    f = _stat_fields(pid)
    return 0.0 if f is None else (int(f[11]) + int(f[12])) / _TICK


def with_children(pid: int) -> list[int]:
    """The process and its direct children (Postgres: the postmaster and its backends)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            f = _stat_fields(entry.name)
            if f is not None and int(f[1]) == pid:
                pids.append(int(entry.name))
    return pids


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    return float(sum(parts) - idle), float(sum(parts))


class CpuMeter:
    """CPU used by named groups of processes over an interval, in cores (1.0 = one core).

    "other" is the rest of the machine: the noise from whatever else runs there.
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._start: dict[str, dict[int, float]] = {}
        self._t0 = 0.0
        self._m0 = (0.0, 0.0)
        self.seconds = 0.0  # the length of the last interval, set by stop()

    def _snap(self) -> dict[str, dict[int, float]]:
        return {name: {p: cpu_seconds(p) for p in pids()} for name, pids in self.groups.items()}

    def start(self) -> None:
        self._start = self._snap()
        self._t0 = time.perf_counter()
        self._m0 = machine_busy()

    def stop(self) -> dict[str, float]:
        end = self._snap()
        wall = self.seconds = time.perf_counter() - self._t0
        busy, total = machine_busy()
        n_cores = (total - self._m0[1]) / max(1e-9, wall * _TICK)
        out: dict[str, float] = {}
        for name, procs in end.items():
            before = self._start.get(name, {})
            used = sum(v - before.get(p, 0.0) for p, v in procs.items())
            out[name] = round(used / wall, 3)
        machine = (busy - self._m0[0]) / max(1e-9, total - self._m0[1]) * n_cores
        out["machine"] = round(machine, 3)
        out["other"] = round(machine - sum(v for k, v in out.items() if k != "machine"), 3)
        return out


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - 127.0.0.1
            return 200 <= int(resp.status) < 300
    except OSError:
        return False


class Service:
    """A service process (`python -m ...`) with its probe URL and memory readings."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path, port: int):
        self.name = name
        self.port = port
        self.proc = ServiceProcess(name, env, logdir / f"{name}.log", args)
        self._profiler: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def start(self) -> Service:
        self.proc.start()
        return self

    async def wait_healthy(self, path: str = "/healthz", within: float = 30) -> None:
        deadline = time.monotonic() + within
        url = f"http://127.0.0.1:{self.port}{path}"
        while time.monotonic() < deadline:
            if not self.proc.alive:
                raise RuntimeError(f"{self.name} exited; log:\n{self.proc.logs()[-3000:]}")
            if await asyncio.to_thread(http_ok, url, 0.5):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.name} not healthy after {within}s")

    def memory(self) -> tuple[float, float]:
        return proc_memory(self.pid)

    def start_profile(self, out: Path) -> None:
        """py-spy record into out (an SVG flame graph) until stop_profile()."""
        spy = Path(sys.executable).parent / "py-spy"
        if not spy.exists():
            log(f"py-spy not installed; no profile of {self.name}")
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        self._profiler = subprocess.Popen(
            [
                str(spy),
                "record",
                "--nonblocking",
                "-r",
                "200",
                "-o",
                str(out),
                "--pid",
                str(self.pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        log(f"py-spy recording {self.name} (pid {self.pid}) into {out}")

    def stop_profile(self) -> None:
        if self._profiler is None:
            return
        self._profiler.send_signal(signal.SIGINT)
        try:
            self._profiler.wait(30)
        except subprocess.TimeoutExpired:
            self._profiler.kill()
            self._profiler.wait()
        self._profiler = None

    def stop(self) -> int:
        self.stop_profile()
        if self.proc.proc is None:
            return 0
        return self.proc.terminate(timeout=20)


# -- servers -----------------------------------------------------------------------------


# The "under 100 MB", in the MiB the figures are read in (VmHWM is in KiB).
RSS_LIMIT_MIB = 100e6 / 2**20


class Stack:
    """Postgres (durable: commits fsync) and Redis in a temporary folder."""

    def __init__(self, root: Path, profile_dir: Path | None = None) -> None:
        make_traversable(root)
        self.root = root
        self.profile_dir = profile_dir
        self.pg = PostgresServer(root / "pg" / "data", durable=True, log=root / "postgres.log")
        self.redis_server = RedisServer(root / "redis", log=root / "redis.log")

    def start(self) -> None:
        log(f"starting Postgres (durable) and Redis in {self.root}")
        self.pg.start()
        self.redis_server.start()
        asyncio.run(migrate(self.pg.dsn))

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.redis_server.stop()
        with contextlib.suppress(Exception):
            self.pg.stop()

    @property
    def dsn(self) -> str:
        return self.pg.dsn

    def cpu_meter(self, *services: Service) -> CpuMeter:
        """Meter the given services, Postgres, Redis and this bench process."""
        groups: dict[str, Callable[[], list[int]]] = {s.name: _pids_of(s) for s in services}
        pg, rs = self.pg.proc, self.redis_server.proc
        assert pg is not None
        assert rs is not None
        groups["postgres"] = lambda: with_children(pg.pid)
        groups["redis"] = lambda: [rs.pid]
        groups["bench"] = lambda: [os.getpid()]
        return CpuMeter(groups)

    def redis(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.redis_server.url)

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "DATABASE_URL": self.pg.dsn,
            "REDIS_URL": self.redis_server.url,
            "LOG_LEVEL": "INFO",
            "METRICS_HOST": "127.0.0.1",
            "API_HOST": "127.0.0.1",
            "SHUTDOWN_GRACE_SECONDS": "5",
            "PYTHONPATH": str(REPO),
        }
        env.update(extra)
        return env

    def service(
        self, kind: str, *, name: str | None = None, app: str = "bench.apps:router", **env: str
    ) -> Service:
        """kind: api, bare_api, relay or worker; its own free port for HTTP / metrics."""
        port = free_port()
        if kind == "api":
            args = [sys.executable, "-m", "api_service"]
            env = {"API_PORT": str(port), **env}
        elif kind == "relay":
            args = [sys.executable, "-m", "relay"]
            env = {"METRICS_PORT": str(port), **env}
        elif kind == "bare_api":  # bench.bare_api: the floor under the API's overhead
            args = [sys.executable, "-m", "bench.bare_api"]
            env = {"API_PORT": str(port), **env}
        elif kind == "worker":
            args = [sys.executable, "-m", "worker_service", "--app", app]
            env = {"METRICS_PORT": str(port), **env}
        else:
            raise ValueError(kind)
        return Service(name or kind, args, self.env(**env), self.root / "logs", port)

    async def reset(self) -> None:
        """Empty tables and Redis (between stages)."""
        await truncate_tables(self.dsn)
        r = self.redis()
        try:
            await r.flushall()
        finally:
            await r.aclose()


async def server_counters(stack: Stack) -> dict[str, float]:
    """Redis calls per command and Postgres commits so far (for per-event ratios)."""
    r = stack.redis()
    try:
        stats: Any = await r.info("commandstats")
    finally:
        await r.aclose()
    out = {f"redis_{k.removeprefix('cmdstat_')}": float(v["calls"]) for k, v in stats.items()}
    conn = await asyncpg.connect(stack.dsn)
    try:
        row = await conn.fetchrow(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = 'postgres'"
        )
    finally:
        await conn.close()
    assert row is not None
    out["pg_commits"] = float(row["xact_commit"])
    return out


def per_event(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """Counter growth per event, the counters that grew by at least 1% of n."""
    out = {}
    for k, v in after.items():
        d = v - before.get(k, 0.0)
        if d >= 0.01 * n:
            out[k] = round(d / n, 4)
    return out


def _pids_of(svc: Service) -> Callable[[], list[int]]:
    return lambda: [svc.pid]


# -- data --------------------------------------------------------------------------------

_INSERT_ROWS = """
INSERT INTO outbox (event_id, task_type, queue, payload, headers)
SELECT gen_random_uuid(), $1, 'default',
       jsonb_build_object('username', 'user_' || g),
       jsonb_build_object('request_id', md5(g::text))
FROM generate_series($2::bigint, $3::bigint) AS g
"""


async def insert_outbox_rows(dsn: str, n: int, task_type: str, chunk: int = 100_000) -> float:
    """Insert n unpublished rows shaped like the API's (payload and headers); seconds taken.

    Then VACUUM ANALYZE, so the relay and its baseline start from the same table state.
    """
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        for start in range(1, n + 1, chunk):
            end = min(n, start + chunk - 1)
            await conn.execute(_INSERT_ROWS, task_type, start, end)
            if n > chunk:
                log(f"  inserted {end:,}/{n:,} outbox rows")
        await conn.execute("VACUUM ANALYZE outbox")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def poll_until(
    probe: Callable[[], Awaitable[int]],
    total: int,
    *,
    interval: float = 0.02,
    within: float,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[float, int, float]:
    """Poll a progress counter until it reaches total.

    Returns (time of the first non-zero reading, the count then, time of reaching total),
    perf_counter clock; the rate is (total - count) / (end - first), which leaves out start-up.
    """
    first_t: float | None = None
    first_n = 0
    deadline = time.monotonic() + within
    last_report = time.monotonic()
    while True:
        n = await probe()
        now = time.perf_counter()
        if n > 0 and first_t is None:
            first_t, first_n = now, n
        if on_progress is not None:
            on_progress(n)
        if n >= total:
            assert first_t is not None
            return first_t, first_n, now
        if time.monotonic() > deadline:
            raise TimeoutError(f"progress {n}/{total} after {within}s")
        if time.monotonic() - last_report > 5:
            log(f"  progress {n:,}/{total:,}")
            last_report = time.monotonic()
        await asyncio.sleep(interval)


class DrainMarks:
    """Memory of a service at 10% and 100% of a drain (VmHWM is the peak so far), and the
    CPU of every process from the first progress seen to the end."""

    def __init__(self, svc: Service, total: int, cpu: CpuMeter) -> None:
        self.svc = svc
        self.total = total
        self.cpu = cpu
        self.started = False
        self.at10: tuple[float, float] | None = None

    def __call__(self, n: int) -> None:
        if not self.started and n > 0:
            self.started = True
            self.cpu.start()
        if self.at10 is None and n >= self.total // 10:
            self.at10 = self.svc.memory()

    def summary(self) -> dict[str, Any]:
        end = self.svc.memory()
        at10 = self.at10 or end
        return {
            "rss10_mib": at10[0],
            "hwm10_mib": at10[1],
            "rss100_mib": end[0],
            "hwm100_mib": end[1],
            "cpu_cores": self.cpu.stop(),
        }
