"""The table on stdout, the JSON file and the latency plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson

from bench.common import Figure
from shared.settings import usable_cpus


def _num(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(figures: list[Figure]) -> str:
    head = ("stage", "figure", "value", "unit", "baseline", "ratio", "target", "ok")
    rows = [head]
    notes = []
    for f in figures:
        ok = {True: "yes", False: "MISS", None: ""}[f.ok]
        ratio = f.ratio
        rows.append(
            (
                f.stage,
                f.name,
                _num(f.value),
                f.unit,
                _num(f.baseline),
                "-" if ratio is None else f"{ratio:.2f}x",
                f.target_label,
                ok,
            )
        )
        extra = "; ".join(
            x for x in (f.baseline_label and f"baseline: {f.baseline_label}", f.note) if x
        )
        notes.append(extra)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for k, r in enumerate(rows):
        line = "  ".join(
            c.rjust(w) if i in (2, 4, 5) else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        lines.append(line.rstrip())
        if k == 0:
            lines.append("-" * len(line))
        elif notes[k - 1]:
            lines.append(" " * (widths[0] + 2) + "  " + notes[k - 1])
    return "\n".join(lines)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY, default=str)
    )


def plot(path: Path, windows: list[dict[str, Any]], idle: dict[str, Any]) -> None:
    """HTTP and commit->done latency percentiles against the offered rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [w["rate"] for w in windows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for ax, key, title in (
        (axes[0], "http_ms_p50_p95_p99", "HTTP latency (from scheduled send)"),
        (axes[1], "e2e_ms_p50_p95_p99", "commit -> handler completion"),
    ):
        for i, (label, style) in enumerate((("p50", "o-"), ("p95", "s-"), ("p99", "^-"))):
            ax.plot(rates, [w[key][i] for w in windows], style, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("offered signups/s (open loop)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axhline(10, color="red", linestyle="--", linewidth=1, label="target p99 @500/s")
    bare = idle.get("bare_chain_ms_p50_p95_p99")
    if bare:
        axes[1].axhline(
            bare[0], color="grey", linestyle=":", linewidth=1, label="bare chain p50 (idle)"
        )
    for ax in axes:
        ax.legend(fontsize=8)
    held = [w["rate"] for w in windows if w["held"]]
    fig.suptitle(
        f"Signup pipeline on {usable_cpus()} cores (all processes on one machine),"
        " durable Postgres;"
        f" held up to {max(held) if held else 0:.0f}/s"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(doc: dict[str, Any]) -> str:
    """The README's table, from a results JSON: `python -m bench.report FILE.json`."""
    m = doc["machine"]
    lines = [
        f"Measured {doc['when'][:16].replace('T', ' ')} UTC at commit `{doc['git']}`"
        f"{' (--quick)' if doc['quick'] else ''}: {m['cores']} cores, Python {m['python']},"
        f" {m['platform']}, load average {m['load_avg'][0]:.2f} at the start.",
        "",
        "| stage | figure | value | baseline (same run) | ratio | target | met |",
        "| --- | --- | ---: | --- | ---: | --- | --- |",
    ]
    for f in doc["figures"]:
        ok = {True: "yes", False: "**no**", None: ""}[f["ok"]]
        ratio = "" if f["ratio"] is None else f"{f['ratio']:.2f}x"
        base = f"{_num(f['baseline'])} ({f['baseline_label']})" if f["baseline_label"] else ""
        name = f["name"] + (f" — {f['note']}" if f["note"] else "")
        value = f"{_num(f['value'])} {f['unit']}"
        lines.append(
            f"| {f['stage']} | {name} | {value} | {base} | {ratio} | {f['target_label']} | {ok} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(markdown(orjson.loads(Path(sys.argv[1]).read_bytes())))
