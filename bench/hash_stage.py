"""Stage 4: signups with the API's production argon2id parameters (its settings' defaults).

Baselines in the same run: the hash-bound limit as the issue defines it, cores / (median
time of one hash with argon2-cffi in this process, timed alone), and what bare hashing
reaches when every core hashes at once (one thread per usable CPU, the API's default pool
size), which also counts what concurrent hashes cost each other in caches and memory
bandwidth. Only the API runs (plus Postgres): the relay and worker add nothing the limit
depends on. For comparison, the API with 64 MiB and t=3 (RFC 9106's memory and passes,
with p=1 as the API hashes), its default until 2026-11-29: its signups/s and the memory it
holds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
from argon2 import PasswordHasher
from argon2.low_level import Type

from api_service.settings import ApiSettings
from bench.common import RSS_LIMIT_MIB, Figure, Stack, StageResult, log, percentile
from bench.e2e_stage import hash_times, post_signup, signup_body
from bench.lean_http import NO_ANSWER, LeanClient
from shared.settings import usable_cpus

STAGE = "4 production hash"
# The API's own defaults: what a deployment that sets nothing runs.
TIME_COST: int = ApiSettings.model_fields["argon2_time_cost"].default
MEMORY_KIB: int = ApiSettings.model_fields["argon2_memory_kib"].default
PRODUCTION = f"argon2id t={TIME_COST}, {MEMORY_KIB / 1024:g} MiB"
# For comparison only: RFC 9106's memory and passes (it says p=4; the API hashes with
# p=1), the API's default until 2026-11-29.
RFC_TIME_COST, RFC_MEMORY_KIB = 3, 65_536
RFC = f"RFC 9106's argon2id (t={RFC_TIME_COST}, {RFC_MEMORY_KIB // 1024} MiB)"
SIGNUP_PATH = "/v1/users"


def parallel_hash_rate(threads: int, duration: float) -> float:
    """Hashes per second with `threads` threads hashing in a loop (argon2-cffi releases the
    GIL), counted over `duration` seconds."""
    ph = PasswordHasher(time_cost=TIME_COST, memory_cost=MEMORY_KIB, parallelism=1, type=Type.ID)
    stop_at = time.perf_counter() + duration

    def hash_until_stop(k: int) -> tuple[int, float]:
        n, started = 0, time.perf_counter()
        while time.perf_counter() < stop_at:
            ph.hash(f"correct horse battery {k} {n}")
            n += 1
        return n, time.perf_counter() - started

    with ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(hash_until_stop, range(threads)))
    # Each thread's count over its own span (its last hash may end after stop_at).
    return sum(n / secs for n, secs in done)


def closed_loop(
    port: int, concurrency: int, duration: float, warmup: float, prefix: str = "p"
) -> tuple[int, int]:
    """`concurrency` clients in a loop, each a thread with the lean client (blocking
    sockets: the load generator's CPU, on the same cores as the API, is about a quarter of
    what aiohttp's client takes, 0.13 against 0.45 ms a signup, measured 2026-11-30);
    (answered 201, answered otherwise) among the answers that came after the warm-up.
    A request with no answer at all (the API gone) ends every client and raises, rather
    than spinning on a refused port. Blocking: run it in a thread."""
    start = time.perf_counter()
    count_from, stop_at = start + warmup, start + warmup + duration
    created = [0] * concurrency
    other = [0] * concurrency
    failed = threading.Event()

    def client(k: int) -> None:
        with LeanClient(port) as http:
            i = 0
            while time.perf_counter() < stop_at and not failed.is_set():
                answer = http.post_json(SIGNUP_PATH, signup_body(f"{prefix}{k}_{i}"))
                i += 1
                if answer.status == NO_ANSWER:
                    failed.set()
                    raise RuntimeError(f"client {k}: no answer from the API on port {port}")
                if count_from <= time.perf_counter() <= stop_at:
                    if answer.status == 201:
                        created[k] += 1
                    else:
                        other[k] += 1

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    return sum(created), sum(other)


async def run(
    stack: Stack,
    hash_samples: int,
    sequential: int,
    duration: float,
    *,
    rfc_comparison: bool = True,
) -> StageResult:
    log(f"stage 4: production hashing ({PRODUCTION}, parallelism 1)")
    await stack.reset()
    # The machine is shared: hashes are timed before and after the load, and the median of
    # both sets is the baseline.
    times = hash_times(TIME_COST, MEMORY_KIB, hash_samples)
    n_cores = usable_cpus()
    log(f"  hash median before the load {percentile(times, 50) * 1000:.1f} ms")
    # Explicit, so that ARGON2_* in the bench's own environment cannot change what runs.
    api = stack.service(
        "api", ARGON2_TIME_COST=str(TIME_COST), ARGON2_MEMORY_KIB=str(MEMORY_KIB)
    ).start()
    try:
        await api.wait_healthy("/readyz")
        url = f"http://127.0.0.1:{api.port}/v1/users"
        async with aiohttp.ClientSession() as session:
            # Every pooled connection is opened on first use: use them all once first.
            await asyncio.gather(*(post_signup(session, url, f"prod_w{i}") for i in range(12)))
            # Each signup paired with a hash timed here just before it: the machine's speed
            # drifts by tens of percent within seconds, a median taken apart would not do.
            seq, paired = [], []
            for i in range(sequential):
                (local,) = hash_times(TIME_COST, MEMORY_KIB, 1)
                _, secs = await post_signup(session, url, f"prod_seq_{i}")
                seq.append(secs)
                paired.append(secs - local)
        seq_med = percentile(seq, 50)
        overhead = percentile(paired, 50)
        concurrency = 4 * n_cores
        # Bare parallel hashing just before and just after the load, the API idle.
        bare_before = await asyncio.to_thread(parallel_hash_rate, n_cores, duration / 2)
        log(f"  bare hashing on {n_cores} threads: {bare_before:.1f} hashes/s")
        log(f"  closed loop, {concurrency} clients, {duration:.0f}s")
        # The CPU over the warm-up second too: the same load, read as cores.
        meter = stack.cpu_meter(api)
        meter.start()
        ok, errors = await asyncio.to_thread(
            closed_loop, api.port, concurrency, duration, warmup=1.0
        )
        cpu = meter.stop()
        rate = ok / duration
        peak = api.memory()[1]
        bare_after = await asyncio.to_thread(parallel_hash_rate, n_cores, duration / 2)
        bare_rate = (bare_before + bare_after) / 2
        log(f"  bare hashing after: {bare_after:.1f} hashes/s")
    finally:
        api.stop()
    after = hash_times(TIME_COST, MEMORY_KIB, hash_samples)
    times += after
    med = percentile(times, 50)
    limit = n_cores / med
    log(
        f"  hash median after {percentile(after, 50) * 1000:.1f} ms, of both {med * 1000:.1f} ms"
        f" -> limit {limit:.1f} signups/s on {n_cores} cores"
    )
    log(f"  {rate:.1f} signups/s ({rate / limit:.0%} of the limit), API peak RSS {peak:.0f} MiB")
    log(f"  CPU (cores): {cpu}")
    rfc = (
        await compare_rfc(stack, hash_samples, n_cores, concurrency, duration / 2)
        if rfc_comparison
        else None
    )
    res = StageResult(
        details={
            "hash_ms": [t * 1000 for t in times],
            "hash_ms_median": med * 1000,
            "cores": n_cores,
            "limit_per_s": limit,
            "bare_parallel_hashes_per_s": [bare_before, bare_after],
            "sequential_http_ms": [t * 1000 for t in seq],
            "sequential_minus_hash_ms": [t * 1000 for t in paired],
            "closed_loop": {
                "concurrency": concurrency,
                "duration_s": duration,
                "ok": ok,
                "errors": errors,
                "rate": rate,
                "cpu_cores": cpu,
            },
            "api_peak_rss_mib": peak,
            "hash_params": {"time_cost": TIME_COST, "memory_kib": MEMORY_KIB},
            "rfc9106": rfc,
        }
    )
    res.figures += [
        Figure(
            STAGE,
            f"signups/s, production hash ({PRODUCTION})",
            rate,
            "/s",
            limit,
            f"cores/hash = {n_cores}/{med * 1000:.0f} ms",
            ">=",
            0.9,
            target_on="ratio",
            target_label=">= 90% of limit",
            note=(
                f"{concurrency} lean clients, {errors} errors; CPU (cores): the API"
                f" {cpu['api']:.2f}, Postgres {cpu['postgres']:.2f}, the load generator"
                f" {cpu['bench']:.2f}, the rest of the machine {cpu['other']:.2f}"
            ),
        ),
        Figure(
            STAGE,
            "signups/s, production hash, vs bare parallel hashing",
            rate,
            "/s",
            bare_rate,
            f"{n_cores} threads hashing, API idle (mean of before and after the load)",
            ">=",
            0.9,
            target_on="ratio",
            target_label=">= 90% of bare parallel",
            note="the issue's target read against a limit measured with every core hashing",
        ),
        Figure(
            STAGE,
            "API overhead beyond hash (sequential, paired)",
            overhead * 1000,
            "ms",
            med * 1000,
            "hash median",
            note=(
                f"median of (signup - a hash timed just before it) over {sequential} signups;"
                f" HTTP p50 {seq_med * 1000:.1f} ms. Not checked against the 1 ms target:"
                " beside a hash of tens of ms, the difference is decided by how fast the host"
                " runs each process at the moment (with a 64 MiB hash of 100-300 ms its median"
                " ranged from -52 to +46 ms between runs); stage 3 measures the overhead with"
                " a cheap hash"
            ),
        ),
        Figure(
            STAGE,
            "API peak RSS, production hash (VmHWM)",
            peak,
            "MiB",
            MEMORY_KIB / 1024 * n_cores,
            f"{MEMORY_KIB / 1024:g} MiB x {n_cores} hash threads",
            "<",
            RSS_LIMIT_MIB,
            target_label="< 100 MB",
        ),
    ]
    if rfc is not None:
        res.figures += rfc_figures(rfc, n_cores, concurrency)
    return res


def rfc_figures(rfc: dict[str, float], n_cores: int, concurrency: int) -> list[Figure]:
    return [
        Figure(
            STAGE,
            f"for comparison: signups/s with {RFC}",
            rfc["rate"],
            "/s",
            rfc["limit_per_s"],
            f"cores/hash = {n_cores}/{rfc['hash_ms_median']:.0f} ms",
            note=f"not the default; {concurrency} lean clients, {rfc['errors']} errors",
        ),
        Figure(
            STAGE,
            "for comparison: API peak RSS with RFC 9106's argon2id (VmHWM)",
            rfc["api_peak_rss_mib"],
            "MiB",
            rfc["api_idle_rss_mib"],
            "RSS idle after start",
            note=f"{RFC_MEMORY_KIB // 1024} MiB x {n_cores} hash threads on top; < 100 MB: "
            + ("yes" if rfc["api_peak_rss_mib"] < 100 else "no"),
        ),
    ]


async def compare_rfc(
    stack: Stack, hash_samples: int, n_cores: int, concurrency: int, duration: float
) -> dict[str, float]:
    """The API with 64 MiB and t=3 (p=1), its default until 2026-11-29: what that
    memory-hardness costs in memory and throughput, measured."""
    log(f"  for comparison: {RFC}, {duration:.0f}s")
    times = hash_times(RFC_TIME_COST, RFC_MEMORY_KIB, hash_samples)
    api = stack.service(
        "api", ARGON2_TIME_COST=str(RFC_TIME_COST), ARGON2_MEMORY_KIB=str(RFC_MEMORY_KIB)
    ).start()
    try:
        await api.wait_healthy("/readyz")
        idle = api.memory()[0]
        ok, errors = await asyncio.to_thread(
            closed_loop, api.port, concurrency, duration, warmup=1.0, prefix="rfc"
        )
        peak = api.memory()[1]
    finally:
        api.stop()
    times += hash_times(RFC_TIME_COST, RFC_MEMORY_KIB, hash_samples)
    med = percentile(times, 50)
    rate = ok / duration
    log(f"    {rate:.1f} signups/s, hash median {med * 1000:.1f} ms, API peak RSS {peak:.0f} MiB")
    return {
        "hash_ms_median": med * 1000,
        "limit_per_s": n_cores / med,
        "rate": rate,
        "errors": errors,
        "api_peak_rss_mib": peak,
        "api_idle_rss_mib": idle,
    }
