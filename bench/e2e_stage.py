"""Stage 3: API + relay + worker as processes; signups sent open-loop at fixed rates.

Commit->completion is what the bench app's handler records: `now - envelope.created_at`,
where created_at is the outbox row's `now()`, i.e. the start of the signup transaction. It
therefore includes the INSERTs and the commit's fsync (an upper bound on commit->done); the
handler itself does nothing before recording, so "beyond handler time" is the value.

Baselines in the same run: the median hash time, a bare signup transaction (the API's
own statement through a bare asyncpg connection), and a bare chain with the design's I/O
and nothing else (commit + NOTIFY -> LISTEN -> claim + XADD -> XREADGROUP BLOCK), idle.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg
import orjson
from argon2 import PasswordHasher
from argon2.low_level import Type

from api_service.users import _SIGNUP as SIGNUP_STATEMENT
from bench import timeline
from bench.apps import LATENCY_KEY
from bench.common import (
    RSS_LIMIT_MIB,
    Figure,
    Service,
    Stack,
    StageResult,
    log,
    median,
    per_event,
    percentile,
    server_counters,
)
from bench.lean_http import Answer, interleaved
from shared.constants import DEFAULT_QUEUE
from shared.settings import usable_cpus

_T = TypeVar("_T")

STAGE = "3 end to end"
# Cheap enough that the stage measures the pipeline, not the hash (stage 4 does that):
# argon2id over 64 KiB takes about 0.05 ms. With 1 MiB (about 1 ms) the hash was a third
# of the API's CPU at 500 signups/s, and commit->done p99 there 24 ms against 16.
CHEAP_TIME_COST = 1
CHEAP_MEMORY_KIB = 64
CHEAP_ARGON2 = {
    "ARGON2_TIME_COST": str(CHEAP_TIME_COST),
    "ARGON2_MEMORY_KIB": str(CHEAP_MEMORY_KIB),
}
HTTP_TIMEOUT = 30.0  # seconds a signup may take before the client counts it as an error
WARMUP = 30  # sequential signups before measuring (API pool size 10, opened lazily)
HELD_SLACK_S = 1.0  # all responses and completions within this long after the last send
IDLE_SPACING = 0.2  # seconds between idle signups to one server


def hash_times(time_cost: int, memory_kib: int, samples: int) -> list[float]:
    """Seconds per argon2id hash with argon2-cffi, as the API hashes (parallelism 1)."""
    ph = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1, type=Type.ID)
    ph.hash("warm-up password")
    out = []
    for i in range(samples):
        t = time.perf_counter()
        ph.hash(f"correct horse battery {i}")
        out.append(time.perf_counter() - t)
    return out


def signup_body(name: str) -> bytes:
    return orjson.dumps(
        {
            "username": name,
            "full_name": "Bench User",
            "email": f"{name}@example.com",
            "password": "correct horse battery staple",
        }
    )


def triple(values: list[float], scale: float = 1000) -> tuple[float, float, float]:
    return (
        percentile(values, 50) * scale,
        percentile(values, 95) * scale,
        percentile(values, 99) * scale,
    )


def fmt3(t: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.1f}" for v in t)


# -- baselines ---------------------------------------------------------------------------


def bare_signup_args(name: str, channel: str) -> list[Any]:
    """Arguments of the API's signup statement (api_service.users._SIGNUP) for a bare
    caller: task type 'bare', so that only the bare relay below claims the row."""
    return [
        name,
        "Bare",
        f"{name}@example.com",
        "x",
        uuid.uuid4(),
        "bare",
        DEFAULT_QUEUE,
        orjson.dumps({"username": name}).decode(),
        "{}",
        channel,
    ]


_BARE_CLAIM = """
SELECT id, created_at FROM outbox
WHERE published_at IS NULL AND available_at <= now() AND task_type = 'bare'
ORDER BY available_at, id LIMIT 1000 FOR UPDATE SKIP LOCKED
"""
_BARE_MARK = "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])"


async def bare_chain(stack: Stack, samples: int, spacing: float) -> tuple[list[float], list[float]]:
    """(signup transaction seconds, commit->read seconds), one event at a time, idle."""
    channel, key = "bench_bare", "bench:bare"
    prod = await asyncpg.connect(stack.dsn)
    listener = await asyncpg.connect(stack.dsn)
    relay = await asyncpg.connect(stack.dsn)
    r_pub, r_sub = stack.redis(), stack.redis()
    await r_sub.xgroup_create(key, "g", id="$", mkstream=True)
    wake = asyncio.Event()
    await listener.add_listener(channel, lambda *_: wake.set())
    latencies: list[float] = []
    tx_times: list[float] = []

    async def relay_loop() -> None:
        while True:
            await wake.wait()
            wake.clear()
            async with relay.transaction():
                rows = await relay.fetch(_BARE_CLAIM)
                if rows:
                    async with r_pub.pipeline(transaction=False) as pipe:
                        for row in rows:
                            pipe.xadd(key, {"t": repr(row["created_at"].timestamp())})
                        await pipe.execute()
                    await relay.execute(_BARE_MARK, [row["id"] for row in rows])

    async def read_loop() -> None:
        while True:
            reply: Any = await r_sub.xreadgroup("g", "c", {key: ">"}, count=100, block=1000)
            now = time.time()
            for sid, fields in reply[0][1] if reply else []:
                latencies.append(now - float(fields[b"t"]))
                await r_sub.xack(key, "g", sid)

    tasks = [asyncio.create_task(relay_loop()), asyncio.create_task(read_loop())]
    try:
        await asyncio.sleep(0.1)
        for i in range(samples):
            name = f"bare_{i}"
            t = time.perf_counter()
            await prod.fetchrow(SIGNUP_STATEMENT, *bare_signup_args(name, channel))
            tx_times.append(time.perf_counter() - t)
            await asyncio.sleep(spacing)
        deadline = time.monotonic() + 5
        while len(latencies) < samples and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in (prod, listener, relay):
            await c.close()
        await r_pub.delete(key)
        await r_pub.aclose()
        await r_sub.aclose()
    return tx_times, latencies


async def timed_calls(
    stack: Stack,
    samples: int,
    spacing: float,
    call: Callable[[asyncpg.Connection[Any], int], Awaitable[object]],
    warmup: int,
) -> list[float]:
    """Seconds each `call(conn, i)` took on one connection, `spacing` seconds apart (0:
    each sent as soon as the last returned), the first `warmup` left out."""
    conn = await asyncpg.connect(stack.dsn)
    out: list[float] = []
    try:
        for i in range(samples + warmup):
            if spacing:
                await asyncio.sleep(spacing)
            t = time.perf_counter()
            await call(conn, i)
            if i >= warmup:
                out.append(time.perf_counter() - t)
    finally:
        await conn.close()
    return out


async def back_to_back_tx_times(stack: Stack, samples: int) -> list[float]:
    """The API's signup statement on one connection, each sent as soon as the last one
    returned, so that neither process sleeps in between (on this VM a process woken from
    idle costs a good part of a millisecond)."""

    def signup(conn: asyncpg.Connection[Any], i: int) -> Awaitable[object]:
        return conn.fetchrow(SIGNUP_STATEMENT, *bare_signup_args(f"b2b_{i}", "bench_none"))

    return await timed_calls(stack, samples, 0, signup, warmup=10)


async def round_trip_times(stack: Stack, samples: int, spacing: float) -> list[float]:
    """`SELECT 1` on one connection, `spacing` seconds apart (0: each sent as soon as the
    last returned): what waking an idle Postgres backend and this process costs the host,
    with no work in between."""

    def select1(conn: asyncpg.Connection[Any], _i: int) -> Awaitable[object]:
        return conn.fetchval("SELECT 1")

    return await timed_calls(stack, samples, spacing, select1, warmup=5)


async def commit_flush_times(
    stack: Stack, prefix: str, samples: int, spacing: float
) -> tuple[list[float], list[float]]:
    """The API's signup statement, in turn on a connection that waits for the commit's
    WAL flush (as the API's does) and on one that does not (`synchronous_commit = off`),
    `spacing` seconds apart (0: back to back): (durable seconds, unflushed seconds). Their
    difference is what the commit's flush costs the host, idle or busy."""
    durable = await asyncpg.connect(stack.dsn)
    unflushed = await asyncpg.connect(stack.dsn)
    await unflushed.execute("SET synchronous_commit = off")
    out: tuple[list[float], list[float]] = ([], [])
    try:
        for i in range(samples + 5):
            for kind, conn, times in zip("du", (durable, unflushed), out, strict=True):
                if spacing:
                    await asyncio.sleep(spacing)
                args = bare_signup_args(f"{prefix}_{kind}{i}", "bench_none")
                t = time.perf_counter()
                await conn.fetchrow(SIGNUP_STATEMENT, *args)
                if i >= 5:
                    times.append(time.perf_counter() - t)
    finally:
        await durable.close()
        await unflushed.close()
    return out


async def pooled_tx_times(stack: Stack, samples: int, reset: bool) -> list[float]:
    """The API's signup statement through an asyncpg pool like the API's (one connection,
    so every sample reuses it), with the pool's default reset on release or none."""

    async def no_reset(_conn: Any) -> None:
        return None

    kwargs: dict[str, Any] = {} if reset else {"reset": no_reset}
    pool = await asyncpg.create_pool(stack.dsn, min_size=1, max_size=1, **kwargs)
    out: list[float] = []
    try:
        for i in range(samples + 3):
            name = f"pool{int(reset)}_{i}"
            t = time.perf_counter()
            await pool.fetchrow(SIGNUP_STATEMENT, *bare_signup_args(name, "bench_none"))
            if i >= 3:
                out.append(time.perf_counter() - t)
            await asyncio.sleep(0.01)
    finally:
        await pool.close()
    return out


# -- load --------------------------------------------------------------------------------


@dataclass
class Window:
    rate: float
    duration: float
    sent: int = 0
    ok: int = 0
    errors: int = 0
    # Errors by HTTP status ("0": no answer, a connection error or a timeout).
    error_statuses: dict[str, int] = field(default_factory=dict)
    http: list[float] = field(default_factory=list)  # from the scheduled send time
    send_lag: list[float] = field(default_factory=list)
    backlog: list[tuple[float, int]] = field(default_factory=list)
    http_done_after: float = math.nan  # seconds after the last send
    e2e_done_after: float = math.nan
    e2e: list[float] = field(default_factory=list)
    to_xadd: list[float] = field(default_factory=list)  # commit->XADD, of e2e
    from_xadd: list[float] = field(default_factory=list)  # XADD->handler, of e2e
    cpu: dict[str, float] = field(default_factory=dict)  # cores used while sending
    calls: dict[str, float] = field(default_factory=dict)  # server calls per signup sent

    @property
    def held(self) -> bool:
        return (
            self.errors <= 0.01 * max(1, self.sent)
            and self.http_done_after <= HELD_SLACK_S
            and self.e2e_done_after <= HELD_SLACK_S
        )

    def summary(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "duration_s": self.duration,
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "error_statuses": self.error_statuses,
            "http_ms_p50_p95_p99": triple(self.http),
            "e2e_ms_p50_p95_p99": triple(self.e2e),
            "commit_to_xadd_ms_p50_p95_p99": triple(self.to_xadd),
            "xadd_to_done_ms_p50_p95_p99": triple(self.from_xadd),
            "send_lag_ms_p99": percentile(self.send_lag, 99) * 1000,
            "http_done_after_s": self.http_done_after,
            "e2e_done_after_s": self.e2e_done_after,
            "backlog_samples": self.backlog,
            "held": self.held,
            "cpu_cores": self.cpu,
            "calls_per_signup": self.calls,
        }


async def collect_records(
    r: Any, expected: int, within: float, names: set[str] | None = None
) -> list[list[str]]:
    """Wait for `expected` records (latency, time, username), or for one of each username
    in `names` if given, then take and clear them all."""

    async def complete() -> bool:
        if names is None:
            return int(await r.llen(LATENCY_KEY)) >= expected
        seen = {x.split(b" ", 3)[2].decode() for x in await r.lrange(LATENCY_KEY, 0, -1)}
        return names <= seen

    deadline = time.monotonic() + within
    while not await complete() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls Redis
        await asyncio.sleep(0.01)
    async with r.pipeline(transaction=True) as pipe:  # none pushed between the two
        pipe.lrange(LATENCY_KEY, 0, -1)
        pipe.delete(LATENCY_KEY)
        raw, _ = await pipe.execute()
    return [x.decode().split(" ") for x in raw]


async def collect_e2e(
    r: Any, expected: int, within: float
) -> tuple[list[float], list[float], list[float]]:
    """Of `expected` completions (or what came within the time): seconds commit->done,
    commit->XADD (the relay's part) and XADD->handler (the worker's part, ms resolution)."""
    total, relay, worker = [], [], []
    for rec in await collect_records(r, expected, within):
        latency, done, xadd = float(rec[0]), float(rec[1]), float(rec[3])
        total.append(latency)
        relay.append(xadd - (done - latency))
        worker.append(done - xadd)
    return total, relay, worker


def busy(cpu: dict[str, float]) -> str:
    """What a CpuMeter's figures (and the stretch's "seconds") say: the machine's busy
    cores, and whose; "other" (the machine less the processes named) with its sign, since
    each figure is read in 10 ms ticks and may be off by one or two of them."""
    parts = ", ".join(
        f"{k} {v:.2f}" for k, v in cpu.items() if k not in ("machine", "seconds") and v != 0
    )
    return (
        f"the machine busy {cpu['machine']:.2f} of {usable_cpus()} cores over"
        f" {cpu['seconds']:.1f} s ({parts})"
    )


async def post_signup(session: aiohttp.ClientSession, url: str, name: str) -> tuple[int, float]:
    t = time.perf_counter()
    async with session.post(
        url, data=signup_body(name), headers={"Content-Type": "application/json"}
    ) as resp:
        await resp.read()
        return resp.status, time.perf_counter() - t


async def open_loop(
    session: aiohttp.ClientSession, url: str, r: Any, w: Window, prefix: str
) -> None:
    """Send rate*duration signups on a fixed schedule, whatever the responses do."""
    n = int(w.rate * w.duration)
    interval = 1 / w.rate
    ok_box = [0]

    async def one(i: int, scheduled: float) -> None:
        w.send_lag.append(time.perf_counter() - scheduled)
        try:
            status, _ = await post_signup(session, url, f"{prefix}_{i}")
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        w.http.append(time.perf_counter() - scheduled)
        if status == 201:
            ok_box[0] += 1
        else:
            w.errors += 1
            w.error_statuses[str(status)] = w.error_statuses.get(str(status), 0) + 1

    async def sample() -> None:
        started = time.perf_counter()
        while True:
            await asyncio.sleep(0.25)
            backlog = ok_box[0] - int(await r.llen(LATENCY_KEY))
            w.backlog.append((round(time.perf_counter() - started, 2), backlog))

    sampler = asyncio.create_task(sample())
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter() + 0.02
    for i in range(n):
        scheduled = start + i * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    w.sent = n
    last_send = time.perf_counter()
    # Every request ends within HTTP_TIMEOUT, answered or timed out. On an overloaded run
    # (1,000/s here) aiohttp once left a few requests neither answered nor timed out and
    # the bench waited forever: past the timeout, what is left is cancelled and counted.
    _, stuck = await asyncio.wait(tasks, timeout=HTTP_TIMEOUT + 10) if tasks else ((), set())
    if stuck:
        log(f"    {len(stuck)} requests neither answered nor timed out: cancelled, as errors")
        for task in stuck:
            task.cancel()
        await asyncio.wait(stuck, timeout=5)
        w.errors += len(stuck)
        w.error_statuses["0"] = w.error_statuses.get("0", 0) + len(stuck)
    w.http_done_after = time.perf_counter() - last_send
    w.ok = ok_box[0]
    while int(await r.llen(LATENCY_KEY)) < w.ok and time.perf_counter() - last_send < 60:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    w.e2e_done_after = time.perf_counter() - last_send
    sampler.cancel()
    await asyncio.gather(sampler, return_exceptions=True)
    w.e2e, w.to_xadd, w.from_xadd = await collect_e2e(r, w.ok, 1)


@dataclass
class Paired:
    """Signups to the API and to the bare server (bench.bare_api), interleaved."""

    api: list[Answer]
    bare: list[Answer]
    server_mean: float  # the mean of the API's own POST /v1/users latency meanwhile

    @staticmethod
    def p50(answers: list[Answer]) -> float:
        """The median seconds of the signups answered 201."""
        return percentile([a.seconds for a in answers if a.status == 201], 50)

    @property
    def api_p50(self) -> float:
        return self.p50(self.api)

    @property
    def bare_p50(self) -> float:
        return self.p50(self.bare)

    def failed(self) -> int:
        return sum(a.status != 201 for a in self.api + self.bare)


async def paired_signups(
    session: aiohttp.ClientSession,
    api_port: int,
    bare_port: int,
    prefix: str,
    count: int,
    chunk: int,
    spacing: float,
) -> Paired:
    """`count` signups to each of the API and the bare server through the lean client,
    `chunk` to one then `chunk` to the other, each sent when the last was answered and
    `spacing` seconds after it. The bare server's usernames start with "bare"."""
    (api, bare), server_mean = await on_server(
        session,
        api_port,
        asyncio.to_thread(
            interleaved,
            "/v1/users",
            [
                (api_port, [signup_body(f"{prefix}_{i}") for i in range(count)]),
                (bare_port, [signup_body(f"bare{prefix}_{i}") for i in range(count)]),
            ],
            max(1, chunk),
            spacing,
        ),
    )
    paired = Paired(api, bare, server_mean)
    if paired.failed():
        log(f"    {paired.failed()} of {2 * count} {prefix} signups not answered 201")
    return paired


async def idle_e2e_of(r: Any, prefix: str, paired: Paired) -> tuple[list[float], list[float]]:
    """Of the API's idle signups: (commit->done seconds from the transaction start (upper
    bound), handler time minus the 201's arrival (a lower bound: the commit came before
    the 201)). The bare server's records are taken too, and left out."""
    answered = {f"{prefix}_{i}": a.arrived for i, a in enumerate(paired.api) if a.status == 201}
    bare = {f"bare{prefix}_{i}" for i, a in enumerate(paired.bare) if a.status == 201}
    taken = await collect_records(r, 0, 10, set(answered) | bare)
    records = [rec for rec in taken if rec[2] in answered]
    upper = [float(rec[0]) for rec in records]
    lower = [float(rec[1]) - answered[rec[2]] for rec in records]
    return upper, lower


async def back_to_back_signups(session: aiohttp.ClientSession, url: str, n: int) -> list[float]:
    """HTTP seconds of `n` signups through aiohttp's client, each sent when the last is
    answered."""
    out = []
    for i in range(n):
        _, secs = await post_signup(session, url, f"b2bclient_{i}")
        out.append(secs)
    return out


async def on_server(
    session: aiohttp.ClientSession, port: int, work: Awaitable[_T]
) -> tuple[_T, float]:
    """`work`'s result, and the mean of the API's own POST /v1/users latency while it ran."""
    sum0, count0 = await server_side(session, port)
    result = await work
    sum1, count1 = await server_side(session, port)
    return result, (sum1 - sum0) / max(1.0, count1 - count0)


async def server_side(session: aiohttp.ClientSession, port: int) -> tuple[float, float]:
    """(sum of seconds, count) of the API's own POST /v1/users latency histogram."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    found = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for kind in found:
            if line.startswith(f"api_http_request_duration_seconds_{kind}{{") and (
                'route="/v1/users"' in line and 'method="POST"' in line
            ):
                found[kind] = float(line.rsplit(" ", 1)[1])
    return found["sum"], found["count"]


# -- the stage ---------------------------------------------------------------------------


async def run(
    stack: Stack, rates: list[int], duration: float, idle_count: int, profile_dir: Path | None
) -> StageResult:
    log("stage 3: end to end (API + relay + worker processes, cheap argon2)")
    await stack.reset()
    cheap = hash_times(CHEAP_TIME_COST, CHEAP_MEMORY_KIB, 50)
    cheap_med = percentile(cheap, 50)
    log(f"  cheap hash median {cheap_med * 1000:.2f} ms; bare chain baseline")
    # As far apart as the idle signups they are the baseline of (IDLE_SPACING / 2 between
    # one server's and the other's): waking up costs more the longer the host has idled.
    tx, bare = await bare_chain(stack, max(20, idle_count), IDLE_SPACING / 2)
    tx_med = percentile(tx, 50)
    pool_reset = percentile(await pooled_tx_times(stack, 30, True), 50)
    pool_plain = percentile(await pooled_tx_times(stack, 30, False), 50)
    log(
        f"  same tx through a pool: {pool_reset * 1000:.2f} ms with asyncpg's default reset,"
        f" {pool_plain * 1000:.2f} ms without"
    )
    log(f"  bare signup statement p50 {tx_med * 1000:.2f} ms, bare chain {fmt3(triple(bare))} ms")
    # Back to back: long enough (1,000 signups to each server in a full run, about 1.5 to
    # 3 s) for the CPU meter's 10 ms ticks to read each process within about 0.01 core.
    b2b_count = 20 * idle_count
    b2b_tx_med = percentile(await back_to_back_tx_times(stack, b2b_count), 50)
    log(f"  bare signup statement back to back p50 {b2b_tx_med * 1000:.2f} ms")
    rt_idle = percentile(await round_trip_times(stack, 40, 0.05), 50)
    rt_b2b = percentile(await round_trip_times(stack, 200, 0), 50)
    log(f"  SELECT 1 p50 {rt_idle * 1000:.3f} ms 50 ms apart, {rt_b2b * 1000:.3f} ms back to back")
    flushed_idle, unflushed_idle = map(
        median, await commit_flush_times(stack, "flush_idle", 40, 0.05)
    )
    flushed_b2b, unflushed_b2b = map(median, await commit_flush_times(stack, "flush_b2b", 200, 0))
    log(
        f"  signup statement 50 ms apart: {flushed_idle * 1000:.2f} ms durable,"
        f" {unflushed_idle * 1000:.2f} ms without the flush; back to back"
        f" {flushed_b2b * 1000:.2f} and {unflushed_b2b * 1000:.2f} ms"
    )
    await stack.reset()

    api = stack.service("api", **CHEAP_ARGON2)
    bare_api = stack.service("bare_api", **CHEAP_ARGON2)
    relay = stack.service("relay")
    worker = stack.service("worker")
    services: list[Service] = [api, relay, worker]
    r = stack.redis()
    res = StageResult()
    try:
        api.start()
        bare_api.start()
        await api.wait_healthy("/readyz")
        await bare_api.wait_healthy()
        idle_mem = {"api": api.memory()[0]}
        url = f"http://127.0.0.1:{api.port}/v1/users"
        connector = aiohttp.TCPConnector(limit=512)
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            # Warm-up: the API's pool opens its connections lazily and hands them out in
            # turn, so every one of them is opened (and its statements prepared) first.
            # The bare server's pool too.
            bare_url = f"http://127.0.0.1:{bare_api.port}/v1/users"
            for i in range(WARMUP):
                await post_signup(session, url, f"warm_{i}")
                await post_signup(session, bare_url, f"bwarm_{i}")

            async def paired(prefix: str, count: int, chunk: int, spacing: float) -> Paired:
                return await paired_signups(
                    session, api.port, bare_api.port, prefix, count, chunk, spacing
                )

            async def timed(prefix: str, count: int, spacing: float) -> dict[str, float]:
                bodies = [signup_body(f"timed{prefix}_{i}") for i in range(count)]
                answers = await asyncio.to_thread(
                    timeline.timed_signups, bare_api.port, bodies, spacing
                )
                ms = timeline.medians_ms(answers)
                log(f"    {prefix}: {timeline.describe(ms)}")
                return ms

            log(
                f"  API alone (relay and worker not started): {b2b_count} signups to each"
                " of the API and the bare server back to back (lean client)"
            )
            meter = stack.cpu_meter(api, bare_api)
            meter.start()
            alone = await paired("alone", b2b_count, b2b_count // 4, 0)
            alone_cpu = meter.stop() | {"seconds": round(meter.seconds, 2)}
            log(f"    CPU (cores): {alone_cpu}")
            log(f"  where a signup's time goes: {b2b_count} timed signups to the bare server")
            timed_alone = await timed("alone", b2b_count, 0)
            relay.start()
            worker.start()
            await relay.wait_healthy()
            await worker.wait_healthy()
            idle_mem |= {s.name: s.memory()[0] for s in (relay, worker)}
            # Let the listener connect, the first polls pass and the backlog drain.
            await collect_e2e(r, 2 * (WARMUP + b2b_count) + b2b_count, 10)
            await asyncio.sleep(1.0)
            if profile_dir is not None:
                for s in services:
                    s.start_profile(profile_dir / f"e2e-{s.name}.svg")
            log(
                f"  idle wake-up: {idle_count} single signups to each of the API and the"
                f" bare server, to each {IDLE_SPACING * 1000:.0f} ms apart, in turn (lean"
                " client)"
            )
            idle = await paired("idle", idle_count, 1, IDLE_SPACING / 2)
            idle_e2e, idle_low = await idle_e2e_of(r, "idle", idle)
            log(
                f"  back to back: {b2b_count} signups to each, each sent when the last is"
                " answered, a quarter at a time to one then the other (lean client)"
            )
            meter = stack.cpu_meter(api, bare_api, relay, worker)
            meter.start()
            b2b = await paired("b2b", b2b_count, b2b_count // 4, 0)
            b2b_cpu = meter.stop() | {"seconds": round(meter.seconds, 2)}
            log(f"    CPU (cores): {b2b_cpu}")
            log(f"  the same through aiohttp's client: {b2b_count} signups to the API")
            b2b_aiohttp = await back_to_back_signups(session, url, b2b_count)
            log(
                f"  where a signup's time goes: {idle_count} timed signups to the bare server"
                f" {IDLE_SPACING * 500:.0f} ms apart, then {b2b_count} back to back"
            )
            timed_idle = await timed("idle", idle_count, IDLE_SPACING / 2)
            timed_b2b = await timed("b2b", b2b_count, 0)
            await collect_e2e(r, 4 * b2b_count + idle_count, 10)
            meter = stack.cpu_meter(*services)
            windows: list[Window] = []
            for rate in rates:
                log(f"  open loop at {rate}/s for {duration:.0f}s")
                w = Window(rate, duration)
                counters0 = await server_counters(stack)
                meter.start()
                await open_loop(session, url, r, w, f"r{rate}")
                w.cpu = meter.stop()
                w.calls = per_event(counters0, await server_counters(stack), w.sent)
                windows.append(w)
                log(f"    CPU (cores): {w.cpu}")
                log(f"    server calls per signup: {w.calls}")
                log(
                    f"    ok {w.ok}/{w.sent}, HTTP ms {fmt3(triple(w.http))}, "
                    f"commit->done ms {fmt3(triple(w.e2e))}, held={w.held}"
                )
                log(
                    f"    of which commit->XADD ms {fmt3(triple(w.to_xadd))}, "
                    f"XADD->handler ms {fmt3(triple(w.from_xadd))}"
                )
                await asyncio.sleep(1.0)
        peak = {s.name: s.memory()[1] for s in services}
    finally:
        for s in services:
            s.stop()
        bare_api.stop()
        await r.aclose()

    bare3 = triple(bare)
    res.details = {
        "cheap_hash_ms_median": cheap_med * 1000,
        "bare_signup_tx_ms_median": tx_med * 1000,
        "pooled_tx_ms_median_default_reset": pool_reset * 1000,
        "pooled_tx_ms_median_no_reset": pool_plain * 1000,
        "bare_chain_ms_p50_p95_p99": bare3,
        "select1_ms_p50_idle": rt_idle * 1000,
        "select1_ms_p50_back_to_back": rt_b2b * 1000,
        "signup_statement_ms_p50_idle_durable_unflushed": (
            flushed_idle * 1000,
            unflushed_idle * 1000,
        ),
        "signup_statement_ms_p50_back_to_back_durable_unflushed": (
            flushed_b2b * 1000,
            unflushed_b2b * 1000,
        ),
        "idle_http_ms_p50": idle.api_p50 * 1000,
        "idle_server_side_ms_mean": idle.server_mean * 1000,
        "idle_e2e_ms_p50_p95_p99": triple(idle_e2e),
        "idle_e2e_lower_bound_ms_p50": percentile(idle_low, 50) * 1000,
        "idle_rss_mib": idle_mem,
        "peak_rss_mib": peak,
        "windows": [w.summary() for w in windows],
    }
    res.figures += [
        Figure(
            STAGE,
            "idle wake-up commit->done p50",
            percentile(idle_e2e, 50) * 1000,
            "ms",
            bare3[0],
            "bare NOTIFY->claim->XADD->XREADGROUP p50",
            "<",
            3,
            target_label="< 3 ms",
            note=f"{len(idle_e2e)} signups {IDLE_SPACING * 1000:.0f} ms apart (the bare server's"
            " in between); from tx start (upper bound); "
            f"from the 201's arrival (lower bound) p50 {percentile(idle_low, 50) * 1000:.2f} ms",
        ),
    ]
    b2b_aiohttp_med = percentile(b2b_aiohttp, 50)
    res.details |= {
        "alone_back_to_back_http_ms_p50": alone.api_p50 * 1000,
        "alone_back_to_back_bare_server_http_ms_p50": alone.bare_p50 * 1000,
        "alone_back_to_back_server_side_ms_mean": alone.server_mean * 1000,
        "idle_bare_server_http_ms_p50": idle.bare_p50 * 1000,
        "back_to_back_http_ms_p50": b2b.api_p50 * 1000,
        "back_to_back_bare_server_http_ms_p50": b2b.bare_p50 * 1000,
        "back_to_back_http_ms_p50_aiohttp_client": b2b_aiohttp_med * 1000,
        "back_to_back_bare_signup_tx_ms_p50": b2b_tx_med * 1000,
        "back_to_back_server_side_ms_mean": b2b.server_mean * 1000,
        "alone_back_to_back_cpu_cores": alone_cpu,
        "back_to_back_cpu_cores": b2b_cpu,
    }
    bare_label = "the same through bench.bare_api (no validation, middleware, metrics, logs)"
    for kind, signups, statement, how, also in (
        (
            "API alone, back to back",
            alone,
            b2b_tx_med,
            "relay and worker not started, each sent when the last was answered",
            f"; {busy(alone_cpu)}",
        ),
        (
            "idle",
            idle,
            tx_med,
            f"{IDLE_SPACING * 1000:.0f} ms apart to each server, one every"
            f" {IDLE_SPACING * 500:.0f} ms in turn",
            "",
        ),
        (
            "back to back",
            b2b,
            b2b_tx_med,
            "each sent when the last was answered",
            f"; {busy(b2b_cpu)}; through aiohttp's client, HTTP p50"
            f" {b2b_aiohttp_med * 1000:.2f} ms",
        ),
    ):
        res.figures.append(
            Figure(
                STAGE,
                f"API overhead beyond hash median ({kind})",
                (signups.api_p50 - cheap_med) * 1000,
                "ms",
                (signups.bare_p50 - cheap_med) * 1000,
                bare_label,
                "<",
                1,
                target_label="< 1 ms",
                note=f"lean client, {how}: HTTP p50 {signups.api_p50 * 1000:.2f} - hash"
                f" {cheap_med * 1000:.2f} ms; the API's own histogram: mean"
                f" {signups.server_mean * 1000:.2f} ms; the signup statement alone"
                f" {statement * 1000:.2f} ms{also}",
            )
        )
    res.figures.append(
        Figure(
            STAGE,
            "host: one Postgres round trip (SELECT 1), 50 ms apart",
            rt_idle * 1000,
            "ms",
            rt_b2b * 1000,
            "the same, back to back",
            note="no project code: the cost of waking an idle backend and client on this host",
        )
    )
    res.figures.append(
        Figure(
            STAGE,
            "host: the commit's WAL flush, 50 ms apart",
            (flushed_idle - unflushed_idle) * 1000,
            "ms",
            (flushed_b2b - unflushed_b2b) * 1000,
            "the same, back to back",
            note="no project code: the API's statement with a durable commit minus the same"
            f" with synchronous_commit = off ({flushed_idle * 1000:.2f} -"
            f" {unflushed_idle * 1000:.2f} ms; back to back {flushed_b2b * 1000:.2f} -"
            f" {unflushed_b2b * 1000:.2f} ms)",
        )
    )
    res.details |= {
        "bare_server_timeline_ms": {
            "alone_back_to_back": timed_alone,
            "idle": timed_idle,
            "back_to_back": timed_b2b,
        }
    }
    res.figures += [
        Figure(
            STAGE,
            f"bare server: a signup's segments, {IDLE_SPACING * 500:.0f} ms apart (sum of medians)",
            sum(timed_idle.values()),
            "ms",
            sum(timed_b2b.values()),
            "the same, back to back",
            note=f"where the time goes (bench.timeline): {timeline.describe(timed_idle)};"
            f" back to back {timeline.describe(timed_b2b)}",
        ),
        Figure(
            STAGE,
            "bare server: a signup's segments, API alone, back to back (sum of medians)",
            sum(timed_alone.values()),
            "ms",
            sum(timed_b2b.values()),
            "the same with the relay and worker running",
            note=f"relay and worker not started: {timeline.describe(timed_alone)}",
        ),
    ]
    res.figures.append(
        Figure(
            STAGE,
            "API overhead beyond hash (API's own histogram, idle)",
            (idle.server_mean - cheap_med) * 1000,
            "ms",
            tx_med * 1000,
            "bare signup statement (the API's, asyncpg, durable commit)",
            "<",
            1,
            target_label="< 1 ms",
            note="mean of api_http_request_duration_seconds over the idle signups (200 ms"
            " apart) minus the hash median: the server's side of the idle figure above",
        )
    )
    held = [w.rate for w in windows if w.held]
    for w in windows:
        h, e = triple(w.http), triple(w.e2e)
        res.figures.append(
            Figure(
                STAGE,
                f"@{w.rate:.0f}/s HTTP p50/p95/p99",
                h[2],
                "ms",
                (cheap_med + tx_med) * 1000,
                "hash median + bare tx",
                note=f"p50/p95/p99 {fmt3(h)}; {w.errors} errors"
                + (f" (by status: {w.error_statuses})" if w.errors else ""),
            )
        )
        is500 = w.rate == 500
        # A p99 over the completions that arrived says nothing of the ones that did not
        # (the slowest, or lost): then it is no figure, and the target is not met.
        complete = len(w.e2e) >= w.ok
        res.figures.append(
            Figure(
                STAGE,
                f"@{w.rate:.0f}/s commit->done p50/p95/p99",
                e[2] if complete else math.nan,
                "ms",
                bare3[2],
                "bare chain p99 (idle)",
                "<=" if is500 else None,
                10 if is500 else None,
                target_label="p99 <= 10 ms" if is500 else "",
                note=f"p50/p95/p99 {fmt3(e)}; held={w.held}"
                + ("" if complete else f"; only {len(w.e2e)} of {w.ok} completions arrived"),
            )
        )
    res.figures.append(
        Figure(
            STAGE,
            "highest rate held (no growing backlog)",
            max(held) if held else 0.0,
            "/s",
            float(max(rates)),
            "highest offered",
            note=f"held: done <= {HELD_SLACK_S:.0f}s after last send, <=1% errors",
        )
    )
    for name in ("api", "relay", "worker"):
        res.figures.append(
            Figure(
                STAGE,
                f"{name} peak RSS under load (VmHWM)",
                peak[name],
                "MiB",
                idle_mem[name],
                "RSS idle after start",
                "<",
                RSS_LIMIT_MIB,
                target_label="< 100 MB",
            )
        )
    return res
