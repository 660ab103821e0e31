"""`make bench-quick` runs end to end: every stage reports figures beside their baselines.

Nothing here looks at how fast anything was (this machine is shared and noisy); it checks
that the benchmark still works, so that the figures in the README can be reproduced.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench.common import REPO
from bench.hash_stage import closed_loop
from bench.timeline import SEGMENTS
from devstack.procs import free_port


@pytest.mark.timeout(600)
def test_quick_bench_reports_every_stage_against_its_baselines(tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "e2e.png"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--backlog",
            "10000",  # stage 5 too, small
            "--out",
            str(out),
            "--plot",
            str(png),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = orjson.loads(out.read_bytes())
    assert doc["errors"] == {}
    assert doc["quick"] is True
    figures = doc["figures"]
    stages = {f["stage"].split()[0] for f in figures}
    assert stages == {"1", "2", "3", "4", "5"}
    for f in figures:
        assert isinstance(f["value"], float | int) and math.isfinite(f["value"]), f
        if f["baseline"] is not None:
            assert f["baseline"] > 0 and math.isfinite(f["ratio"]), f
        if f["target"] is not None:
            assert f["ok"] in (True, False), f
    # Every issue target is on the table.
    labels = {f["target_label"] for f in figures}
    for target in (">= 25,000/s", ">= 8,000/s", "< 3 ms", "< 1 ms", "p99 <= 10 ms"):
        assert target in labels, (target, labels)
    # The bare server's signups split at each hand-over, on one clock: none runs backwards.
    timeline = doc["details"]["e2e"]["bare_server_timeline_ms"]
    for when in ("alone_back_to_back", "idle", "back_to_back"):
        assert list(timeline[when]) == list(SEGMENTS)
        assert all(0 <= ms < 1000 for ms in timeline[when].values()), timeline
    # Progress on stderr, the table on stdout, and the plot.
    assert "stage 1: relay drain" in run.stderr
    assert "figures," in run.stdout and "targets missed" in run.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stage_4s_load_stops_and_fails_when_the_api_is_gone() -> None:
    """Its clients are threads with blocking sockets: with nothing on the port, they must
    not spin on refused connections for the whole stage and report a rate beside "errors"."""
    with pytest.raises(RuntimeError, match="no answer from the API"):
        closed_loop(free_port(), concurrency=4, duration=600, warmup=0)
