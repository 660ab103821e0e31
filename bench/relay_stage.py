"""Stage 1: one relay process drains N outbox rows into the stream.

Baselines in the same run, on the same rows: (a) a bare asyncpg loop that claims and marks
them in batches of 1000 (what Postgres allows), (b) a bare pipelined XADD loop of the same
envelopes (what Redis and redis-py allow), and their serial combination 1/(1/a + 1/b).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench.common import (
    RSS_LIMIT_MIB,
    DrainMarks,
    Figure,
    Stack,
    StageResult,
    insert_outbox_rows,
    log,
    per_event,
    poll_until,
    server_counters,
)
from shared.constants import ENVELOPE_FIELD, TASK_SEND_VERIFY_EMAIL, stream_key
from shared.envelope import Envelope

STAGE = "1 relay drain"
BATCH = 1000

_CLAIM = """
SELECT id, event_id, task_type, queue, payload, headers, created_at
FROM outbox
WHERE published_at IS NULL AND available_at <= now()
ORDER BY available_at, id
LIMIT $1
FOR UPDATE SKIP LOCKED
"""
_MARK = """
UPDATE outbox SET published_at = now(), stream_id = '0-1',
    publish_attempts = publish_attempts + 1
WHERE id = ANY($1::bigint[])
"""


async def bare_claim_and_mark(dsn: str) -> tuple[float, int]:
    """Baseline (a): SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1000 + UPDATE ... = ANY,
    committed as the relay commits (no WAL flush: `synchronous_commit = off`)."""
    conn = await asyncpg.connect(dsn, server_settings={"synchronous_commit": "off"})
    n = 0
    try:
        started = time.perf_counter()
        while True:
            async with conn.transaction():
                rows = await conn.fetch(_CLAIM, BATCH)
                if not rows:
                    break
                await conn.execute(_MARK, [r["id"] for r in rows])
            n += len(rows)
        return time.perf_counter() - started, n
    finally:
        await conn.close()


async def load_envelopes(dsn: str) -> list[bytes]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT event_id, task_type, payload::text, headers::text, created_at "
            "FROM outbox ORDER BY id"
        )
    finally:
        await conn.close()
    return [
        Envelope(
            event_id=str(r["event_id"]),
            type=r["task_type"],
            payload=orjson.loads(r["payload"]),
            created_at=r["created_at"],
            headers=orjson.loads(r["headers"]),
        ).encode()
        for r in rows
    ]


async def bare_xadd(stack: Stack, envelopes: list[bytes], key: str) -> float:
    """Baseline (b): pipelined XADD of the envelopes, 1000 per round trip."""
    r = stack.redis()
    try:
        started = time.perf_counter()
        for start in range(0, len(envelopes), BATCH):
            async with r.pipeline(transaction=False) as pipe:
                for data in envelopes[start : start + BATCH]:
                    pipe.xadd(key, {ENVELOPE_FIELD: data})
                await pipe.execute()
        elapsed = time.perf_counter() - started
        await r.delete(key)
        return elapsed
    finally:
        await r.aclose()


async def drain_with_relay(
    stack: Stack, n: int, profile: Path | None, label: str, processes: int = 1
) -> dict[str, Any]:
    """Start `python -m relay` (`processes` of them) on a table of n unpublished rows;
    rate, and memory of the first."""
    r = stack.redis()
    counters0 = await server_counters(stack)
    others = [stack.service("relay", name=f"relay{i + 2}").start() for i in range(processes - 1)]
    relay = stack.service("relay").start()
    try:
        marks = DrainMarks(relay, n, stack.cpu_meter(relay, *others))
        if profile is not None:
            await relay.wait_healthy()
            relay.start_profile(profile)

        async def published() -> int:
            return int(await r.xlen(stream_key()))

        first_t, first_n, _ = await poll_until(
            published, n, within=max(120, n / 500), on_progress=marks
        )
        # The batch's UPDATE commits after its XADD: wait for it too.
        conn = await asyncpg.connect(stack.dsn)
        try:
            unpublished = "SELECT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL)"
            while await conn.fetchval(unpublished):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        finally:
            await conn.close()
        end_t = time.perf_counter()
        mem = marks.summary()
        rate = (n - first_n) / (end_t - first_t)
        log(f"  {label}: {rate:,.0f} events/s, peak RSS {mem['hwm100_mib']:.1f} MiB")
        log(f"    CPU (cores): {mem['cpu_cores']}")
        got = {"rate": rate, "seconds": end_t - first_t, "counted": n - first_n, **mem}
    finally:
        for svc in [relay, *others]:
            svc.stop()
        await r.aclose()
    # After the stop: Postgres counts a backend's commits when the backend reports them.
    await asyncio.sleep(0.6)
    got["calls_per_event"] = per_event(counters0, await server_counters(stack), n)
    log(f"    server calls per event: {got['calls_per_event']}")
    return got


async def run(stack: Stack, n: int, profile_dir: Path | None) -> StageResult:
    log(f"stage 1: relay drain of {n:,} rows")
    await stack.reset()
    secs = await insert_outbox_rows(stack.dsn, n, TASK_SEND_VERIFY_EMAIL)
    log(f"  inserted {n:,} rows in {secs:.1f}s; baseline (a) bare claim+mark loop")
    envelopes = await load_envelopes(stack.dsn)
    a_secs, a_n = await bare_claim_and_mark(stack.dsn)
    a_rate = a_n / a_secs
    log(f"  baseline (a): {a_rate:,.0f} rows/s; baseline (b) bare pipelined XADD")
    b_rate = len(envelopes) / await bare_xadd(stack, envelopes, "bench:xadd")
    log(f"  baseline (b): {b_rate:,.0f} XADD/s")
    serial = 1 / (1 / a_rate + 1 / b_rate)

    await stack.reset()
    await insert_outbox_rows(stack.dsn, n, TASK_SEND_VERIFY_EMAIL)
    log("  rows inserted again; starting one relay process")
    prof = profile_dir / "relay.svg" if profile_dir else None
    got = await drain_with_relay(stack, n, prof, "relay")

    await stack.reset()
    await insert_outbox_rows(stack.dsn, n, TASK_SEND_VERIFY_EMAIL)
    log("  rows inserted again; two relay processes side by side (SKIP LOCKED)")
    two = await drain_with_relay(stack, n, None, "2 relays", processes=2)

    res = StageResult(
        details={
            "two_relays": two,
            "rows": n,
            "bare_claim_mark_rows_per_s": a_rate,
            "bare_xadd_per_s": b_rate,
            "bare_serial_bound_per_s": serial,
            "relay": got,
        }
    )
    rate = got["rate"]
    res.figures += [
        Figure(
            STAGE,
            "relay events/s vs bare claim+mark (a)",
            rate,
            "ev/s",
            a_rate,
            "bare asyncpg SELECT SKIP LOCKED+UPDATE",
            ">=",
            25_000,
            target_label=">= 25,000/s",
        ),
        Figure(
            STAGE,
            "relay events/s vs bare pipelined XADD (b)",
            rate,
            "ev/s",
            b_rate,
            "bare redis.asyncio pipelined XADD",
        ),
        Figure(
            STAGE,
            "relay events/s vs serial bound 1/(1/a+1/b)",
            rate,
            "ev/s",
            serial,
            "a and b one after the other",
        ),
        Figure(
            STAGE,
            "2 relay processes together (events/s)",
            two["rate"],
            "ev/s",
            rate,
            "one relay process",
            note="batches overlap: one claims while the other publishes",
        ),
        Figure(
            STAGE,
            "relay peak RSS (VmHWM)",
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
