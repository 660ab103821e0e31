"""Where a signup's time goes, hand-over by hand-over, through the bare server.

`bench.bare_api`'s `POST /v1/users/timed` answers with the `time.perf_counter_ns()` of each
hand-over in the server, and the lean client knows when it sent the request and when the
answer's last byte came, on the same clock (CLOCK_MONOTONIC on Linux, one for every
process). The differences split a signup into the segments below. No profile shows this:
a sampling profiler sees CPU, and most of an idle signup is threads and processes waking.
"""

from __future__ import annotations

from itertools import pairwise
from statistics import median

import orjson

from bench.lean_http import Answer, interleaved

TIMED_PATH = "/v1/users/timed"

SEGMENTS = (
    "to the handler",  # the client's send; the server wakes, aiohttp reads the head
    "body read",
    "to the hash thread",  # submit() until the thread starts hashing
    "hash",
    "back to the event loop",  # the hash's end until the handler runs again
    "statement",  # the signup statement's round trip: Postgres wakes, inserts, flushes
    "back to the client",  # the answer built and written; the client wakes and reads it
)


def split(answer: Answer) -> list[float] | None:
    """The seconds of each of SEGMENTS in one timed signup; None if it was not a 201."""
    if answer.status != 201:
        return None
    marks = orjson.loads(answer.body)["marks_ns"]
    if len(marks) != len(SEGMENTS) - 1:
        raise ValueError(f"expected {len(SEGMENTS) - 1} marks, got {len(marks)}")
    points = [answer.sent * 1e9, *marks, (answer.sent + answer.seconds) * 1e9]
    return [(later - earlier) / 1e9 for earlier, later in pairwise(points)]


def medians_ms(answers: list[Answer]) -> dict[str, float]:
    """The median milliseconds of each segment over the signups answered 201."""
    splits = [s for s in map(split, answers) if s is not None]
    if not splits:
        raise ValueError("no timed signup was answered 201")
    return {name: median(s[i] for s in splits) * 1000 for i, name in enumerate(SEGMENTS)}


def timed_signups(port: int, bodies: list[bytes], spacing: float) -> list[Answer]:
    """POST each body to the bare server's timed route, each sent when the last was
    answered and `spacing` seconds after it (blocking: run it in a thread)."""
    (answers,) = interleaved(TIMED_PATH, [(port, bodies)], max(1, len(bodies)), spacing)
    return answers


def describe(ms: dict[str, float]) -> str:
    """'to the handler 0.31, body read 0.01, ... ms'."""
    return ", ".join(f"{name} {value:.2f}" for name, value in ms.items()) + " ms"
