"""`python -m bench [--quick] [--out FILE.json] [--plot FILE.png] [--profile DIR]`."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import backlog_stage, e2e_stage, hash_stage, relay_stage, worker_stage
from bench.common import REPO, Figure, Stack, StageResult, log
from bench.report import plot, table, write_json
from shared.settings import usable_cpus


@dataclass(frozen=True)
class Plan:
    relay_rows: int
    worker_entries: int
    rates: list[int]
    rate_seconds: float
    idle_signups: int
    hash_samples: int
    hash_sequential: int
    hash_seconds: float
    backlog_rows: int  # 0: skipped
    rfc_comparison: bool  # stage 4 also runs the API with RFC 9106's 64 MiB argon2id


FULL = Plan(200_000, 200_000, [200, 300, 400, 500, 1000], 10.0, 50, 7, 10, 10.0, 1_000_000, True)
QUICK = Plan(12_000, 12_000, [200, 500], 3.0, 10, 3, 2, 3.0, 0, False)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latest.json")
    p.add_argument("--plot", type=Path, default=REPO / "bench" / "results" / "e2e.png")
    p.add_argument("--stages", default="1,2,3,4,5", help="comma-separated stage numbers")
    p.add_argument(
        "--backlog",
        type=int,
        default=None,
        help="rows for stage 5 (default 1,000,000; skipped with --quick)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy flame graphs of the relay and worker drains, and of the three services"
        " during the end-to-end stage, into this folder",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary server folder")
    return p.parse_args(argv)


def git_rev() -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = subprocess.run(
        # The results the bench itself writes do not make the code dirty.
        [
            "git",
            "-C",
            str(REPO),
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":!bench/results",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


async def run_stages(
    stack: Stack, plan: Plan, stages: set[int], profile: Path | None
) -> tuple[dict[str, StageResult], dict[str, str]]:
    jobs: list[tuple[int, str, Callable[[], Awaitable[StageResult]]]] = [
        (1, "relay", lambda: relay_stage.run(stack, plan.relay_rows, profile)),
        (2, "worker", lambda: worker_stage.run(stack, plan.worker_entries, profile)),
        (
            3,
            "e2e",
            lambda: e2e_stage.run(stack, plan.rates, plan.rate_seconds, plan.idle_signups, profile),
        ),
        (
            4,
            "hash",
            lambda: hash_stage.run(
                stack,
                plan.hash_samples,
                plan.hash_sequential,
                plan.hash_seconds,
                rfc_comparison=plan.rfc_comparison,
            ),
        ),
        (5, "backlog", lambda: backlog_stage.run(stack, plan.backlog_rows)),
    ]
    results: dict[str, StageResult] = {}
    errors: dict[str, str] = {}
    # `kill -USR1 <bench pid>` prints where every task is waiting (a stage that seems stuck).
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_tasks)
    for number, name, job in jobs:
        if number not in stages:
            continue
        if number == 5 and plan.backlog_rows <= 0:
            log("stage 5 skipped (--quick): see the 10%/100% RSS of stages 1 and 2")
            continue
        started = time.monotonic()
        try:
            results[name] = await job()
        except Exception:
            errors[name] = traceback.format_exc()
            log(f"stage {number} ({name}) FAILED:\n{errors[name]}")
        log(f"stage {number} ({name}) took {time.monotonic() - started:.0f}s")
    return results, errors


def dump_tasks() -> None:
    tasks = asyncio.all_tasks()
    log(f"SIGUSR1: {len(tasks)} tasks")
    for task in tasks:
        task.print_stack(limit=8, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    plan = QUICK if args.quick else FULL
    if args.backlog is not None:
        plan = Plan(**{**plan.__dict__, "backlog_rows": args.backlog})
    stages = {int(s) for s in args.stages.split(",") if s.strip()}
    root = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    stack = Stack(root, args.profile)
    began = time.monotonic()
    # Read before anything starts: at the end they would say when the run ended and how
    # busy it kept the machine, not what it started on.
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_at_start = os.getloadavg()
    # SIGTERM (a timeout, a CI runner) unwinds like Ctrl-C, so the servers and services
    # the bench started are stopped and its folder removed, not left running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        stack.start()
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results, errors = runner.run(run_stages(stack, plan, stages, args.profile))
    finally:
        stack.stop()
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    figures: list[Figure] = [f for r in results.values() for f in r.figures]
    notes = []
    if args.quick:
        notes.append(
            f"--quick: {plan.relay_rows:,} rows/entries, rates"
            f" {' and '.join(map(str, plan.rates))}/s for {plan.rate_seconds:.0f} s, stage 4"
            f" shortened ({plan.hash_samples} hashes, {plan.hash_seconds:.0f} s, no RFC 9106"
            " comparison), "
            + (
                f"stage 5 with {plan.backlog_rows:,} rows (--backlog)"
                if plan.backlog_rows > 0
                else "stage 5 skipped (flatness: 10% vs 100% RSS of stages 1-2)"
            )
        )
    notes.append(
        "commit->done is measured from the signup transaction's start (outbox.created_at = "
        "now()), so it includes the INSERTs and the commit fsync; the handler records first"
    )
    doc: dict[str, Any] = {
        "when": started_at,
        "git": git_rev(),
        "quick": args.quick,
        "plan": plan.__dict__,
        "machine": {
            "cores": usable_cpus(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "load_avg": load_at_start,
        },
        "seconds": time.monotonic() - began,
        "notes": notes,
        "figures": [f.as_dict() for f in figures],
        "details": {name: r.details for name, r in results.items()},
        "errors": errors,
    }
    write_json(args.out, doc)
    if "e2e" in results:
        plot(args.plot, results["e2e"].details["windows"], results["e2e"].details)
        log(f"plot written to {args.plot}")
    print(table(figures))
    for n in notes:
        print(f"note: {n}")
    missed = [f.name for f in figures if f.ok is False]
    print(
        f"\n{len(figures)} figures, {len(missed)} targets missed; "
        f"{time.monotonic() - began:.0f}s; JSON in {args.out}"
    )
    for name, err in errors.items():
        print(f"stage {name} failed: {err.strip().splitlines()[-1]}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
