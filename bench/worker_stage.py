"""Stage 2: one worker process drains N "incr" entries put in the stream beforehand.

Baseline in the same run: a bare XREADGROUP COUNT 500 + XACK loop over the same entries
(its own consumer group, so the worker still finds them all).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.apps import COUNTER_KEY
from bench.common import (
    RSS_LIMIT_MIB,
    DrainMarks,
    Figure,
    Stack,
    StageResult,
    log,
    per_event,
    poll_until,
    server_counters,
)
from shared.autopipeline import AutoPipelineRedis
from shared.constants import CONSUMER_GROUP, ENVELOPE_FIELD, stream_key
from shared.envelope import Envelope

STAGE = "2 worker drain"
READ_COUNT = 500
WORKER_CONCURRENCY = 64  # the worker's default (WORKER_CONCURRENCY)


# Each entry's outbox row, published and not completed, as the relay leaves it: the worker's
# batched completion UPDATE then writes a row per entry, as it does in production. (Without
# them it matched nothing and wrote nothing: the worker measured about 18% quicker, with
# Postgres idle.)
_PUBLISHED_ROWS = """
INSERT INTO outbox (event_id, task_type, payload, headers, published_at)
SELECT e, 'incr', jsonb_build_object('username', 'user_' || i), '{}'::jsonb, now()
FROM unnest($1::uuid[]) WITH ORDINALITY AS t(e, i)
"""


async def fill_stream(stack: Stack, n: int) -> float:
    """XADD n "incr" envelopes (headers like the API's), each with its outbox row; seconds
    taken."""
    r = stack.redis()
    conn = await asyncpg.connect(stack.dsn)
    key = stream_key()
    started = time.perf_counter()
    try:
        for start in range(0, n, 1000):
            ids = [uuid.uuid4() for _ in range(start, min(n, start + 1000))]
            await conn.execute(_PUBLISHED_ROWS, ids)
            async with r.pipeline(transaction=False) as pipe:
                for i, event_id in enumerate(ids, start):
                    env = Envelope(
                        event_id=str(event_id),
                        type="incr",
                        payload={"username": f"user_{i}"},
                        created_at=datetime.now(UTC),
                        headers={"request_id": uuid.uuid4().hex},
                    )
                    pipe.xadd(key, {ENVELOPE_FIELD: env.encode()})
                await pipe.execute()
        await conn.execute("VACUUM ANALYZE outbox")
    finally:
        await r.aclose()
        await conn.close()
    return time.perf_counter() - started


async def bare_read_ack(stack: Stack, n: int) -> float:
    """Baseline: XREADGROUP COUNT 500 + XACK until the group has read everything."""
    r = stack.redis()
    key, group = stream_key(), "bench-bare"
    try:
        await r.xgroup_create(key, group, id="0")
        done = 0
        started = time.perf_counter()
        while True:
            reply: Any = await r.xreadgroup(group, "bare", {key: ">"}, count=READ_COUNT)
            if not reply or not reply[0][1]:
                break
            ids = [i for i, _ in reply[0][1]]
            await r.xack(key, group, *ids)
            done += len(ids)
        elapsed = time.perf_counter() - started
        assert done == n, (done, n)
        await r.xgroup_destroy(key, group)
        return elapsed
    finally:
        await r.aclose()


async def bare_read_incr_ack(stack: Stack, n: int, concurrency: int, auto: bool) -> float:
    """Baseline 2: like the worker's defaults, read `concurrency` entries, one INCR each
    (concurrently, one asyncio task per entry), then XACK them; no decoding, no bookkeeping.
    The INCR goes through plain redis.asyncio, or (`auto`) through the auto-pipelining
    client that the worker gives its handlers."""
    r = stack.redis()
    key, group = stream_key(), "bench-bare-incr"
    h = AutoPipelineRedis(connection_pool=r.connection_pool) if auto else r

    async def incr() -> None:
        await h.incr("bench:bare-incr")

    try:
        await r.xgroup_create(key, group, id="0")
        done = 0
        started = time.perf_counter()
        while True:
            reply: Any = await r.xreadgroup(group, "bare", {key: ">"}, count=concurrency)
            if not reply or not reply[0][1]:
                break
            ids = [i for i, _ in reply[0][1]]
            await asyncio.gather(*(asyncio.create_task(incr()) for _ in ids))
            await r.xack(key, group, *ids)
            done += len(ids)
        elapsed = time.perf_counter() - started
        assert done == n, (done, n)
        await r.xgroup_destroy(key, group)
        await r.delete("bench:bare-incr")
        return elapsed
    finally:
        await r.aclose()


async def drain_with_worker(
    stack: Stack, n: int, profile: Path | None, label: str
) -> dict[str, Any]:
    """Start `python -m worker_service --app bench.apps:router`; rate and memory."""
    r = stack.redis()
    await r.delete(COUNTER_KEY)
    counters0 = await server_counters(stack)
    worker = stack.service("worker").start()
    try:
        marks = DrainMarks(worker, n, stack.cpu_meter(worker))
        if profile is not None:
            await worker.wait_healthy()
            worker.start_profile(profile)

        async def handled() -> int:
            return int(await r.get(COUNTER_KEY) or 0)

        first_t, first_n, _ = await poll_until(
            handled, n, within=max(120, n / 300), on_progress=marks
        )
        # Completion is recorded and the entries acknowledged after the handler: wait.
        while True:
            pending: Any = await r.xpending(stream_key(), CONSUMER_GROUP)
            if int(pending["pending"]) == 0:
                break
            await asyncio.sleep(0.01)
        end_t = time.perf_counter()
        mem = marks.summary()
        rate = (n - first_n) / (end_t - first_t)
        log(f"  {label}: {rate:,.0f} entries/s, peak RSS {mem['hwm100_mib']:.1f} MiB")
        log(f"    CPU (cores): {mem['cpu_cores']}")
        got = {"rate": rate, "seconds": end_t - first_t, "counted": n - first_n, **mem}
    finally:
        worker.stop()
        await r.aclose()
    # After the stop: Postgres counts a backend's commits when the backend reports them.
    await asyncio.sleep(0.6)
    got["calls_per_event"] = per_event(counters0, await server_counters(stack), n)
    log(f"    server calls per event: {got['calls_per_event']}")
    return got


async def run(stack: Stack, n: int, profile_dir: Path | None) -> StageResult:
    log(f"stage 2: worker drain of {n:,} entries")
    await stack.reset()
    secs = await fill_stream(stack, n)
    log(f"  {n:,} entries in the stream ({secs:.1f}s); baseline: bare XREADGROUP+XACK")
    base = n / await bare_read_ack(stack, n)
    log(f"  baseline: {base:,.0f} entries/s; baseline 2: read 64 + 64 INCR tasks + XACK")
    base2 = n / await bare_read_incr_ack(stack, n, WORKER_CONCURRENCY, auto=False)
    base3 = n / await bare_read_incr_ack(stack, n, WORKER_CONCURRENCY, auto=True)
    log(f"  baseline 2: {base2:,.0f} entries/s (plain INCR), {base3:,.0f} (auto-pipelined)")
    log("  starting one worker process")
    prof = profile_dir / "worker.svg" if profile_dir else None
    got = await drain_with_worker(stack, n, prof, "worker")
    res = StageResult(
        details={
            "entries": n,
            "bare_read_ack_per_s": base,
            "bare_read_incr_ack_per_s": base2,
            "bare_read_autopipelined_incr_ack_per_s": base3,
            "worker": got,
        }
    )
    res.figures += [
        Figure(
            STAGE,
            "worker entries/s (handler: 1 INCR)",
            got["rate"],
            "ent/s",
            base,
            "bare XREADGROUP COUNT 500 + XACK",
            ">=",
            8_000,
            target_label=">= 8,000/s",
        ),
        Figure(
            STAGE,
            "worker entries/s vs bare loop, plain redis.asyncio INCR",
            got["rate"],
            "ent/s",
            base2,
            "bare XREADGROUP 64 + 64 INCR tasks + XACK",
        ),
        Figure(
            STAGE,
            "worker entries/s vs bare loop with the handler's auto-pipelined INCR",
            got["rate"],
            "ent/s",
            base3,
            "the same bare loop, INCR through AutoPipelineRedis",
        ),
        Figure(
            STAGE,
            "worker peak RSS (VmHWM)",
            got["hwm100_mib"],
            "MiB",
            got["hwm10_mib"],
            "VmHWM after 10% drained",
            "<",
            RSS_LIMIT_MIB,
            target_label="< 100 MB",
        ),
    ]
    return res
