"""Stage 5: a backlog of N rows: does the peak RSS of the relay and the worker stay flat?

The relay drains N outbox rows of "incr" tasks into the stream, then the worker drains the
N stream entries (marking the real outbox rows completed). Each is read at 10% and at
100% of its drain: the 10% reading is the baseline of the 100% one.
"""

from __future__ import annotations

from bench.common import RSS_LIMIT_MIB, Figure, Stack, StageResult, insert_outbox_rows, log
from bench.relay_stage import drain_with_relay
from bench.worker_stage import drain_with_worker

STAGE = "5 backlog"
FLAT = 1.10  # at most 10% more at 100% than at 10%


async def run(stack: Stack, n: int) -> StageResult:
    log(f"stage 5: backlog of {n:,} rows, relay then worker")
    await stack.reset()
    secs = await insert_outbox_rows(stack.dsn, n, "incr")
    log(f"  inserted {n:,} rows in {secs:.1f}s; relay drains them")
    relay = await drain_with_relay(stack, n, None, "relay (backlog)")
    log("  worker drains the stream")
    worker = await drain_with_worker(stack, n, None, "worker (backlog)")
    res = StageResult(details={"rows": n, "relay": relay, "worker": worker})
    for name, got in (("relay", relay), ("worker", worker)):
        res.figures += [
            Figure(
                STAGE,
                f"{name} peak RSS after 100% (VmHWM)",
                got["hwm100_mib"],
                "MiB",
                got["hwm10_mib"],
                "VmHWM after 10%",
                "<=",
                FLAT,
                target_on="ratio",
                target_label="flat (<= +10%)",
                note=f"RSS now {got['rss100_mib']:.0f} MiB; < 100 MB: "
                f"{'yes' if got['hwm100_mib'] < RSS_LIMIT_MIB else 'NO'}",
            ),
            Figure(
                STAGE,
                f"{name} rate with {n:,} backlog",
                got["rate"],
                "/s",
                None,
                "",
                note="for comparison with stages 1-2",
            ),
        ]
    return res
