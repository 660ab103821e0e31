"""bench.timeline splits a timed signup at each hand-over, on one clock for the client and
the server."""

from __future__ import annotations

import orjson
import pytest

from bench.lean_http import NO_ANSWER, Answer
from bench.timeline import SEGMENTS, describe, medians_ms, split


def timed(sent: float, marks_ms: list[float], done_ms: float, status: int = 201) -> Answer:
    """An answer sent at `sent` seconds whose server marks and last byte come the given
    milliseconds after it."""
    marks = [round((sent + m / 1000) * 1e9) for m in marks_ms]
    body = orjson.dumps({"username": "u", "marks_ns": marks})
    return Answer(status, done_ms / 1000, 0.0, sent, body)


def test_a_signup_splits_into_its_segments() -> None:
    answer = timed(5000.0, [0.3, 0.31, 0.4, 0.45, 0.5, 1.5], 1.7)
    got = [round(s * 1000, 6) for s in split(answer) or []]
    assert got == [0.3, 0.01, 0.09, 0.05, 0.05, 1.0, 0.2]
    assert len(got) == len(SEGMENTS)
    assert sum(got) == pytest.approx(1.7)


def test_only_signups_answered_201_count() -> None:
    assert split(Answer(NO_ANSWER, 0.1, 0.0)) is None
    fast = timed(1.0, [0.1, 0.1, 0.2, 0.2, 0.3, 0.4], 0.5)
    slow = timed(2.0, [0.3, 0.3, 0.4, 0.4, 0.5, 0.6], 0.9)
    ms = medians_ms([fast, slow, timed(3.0, [9, 9, 9, 9, 9, 9], 9, status=409)])
    assert list(ms) == list(SEGMENTS)
    assert ms["to the handler"] == pytest.approx(0.2)
    assert ms["back to the client"] == pytest.approx(0.2)
    assert describe(ms).startswith("to the handler 0.20, body read 0.00,")
    with pytest.raises(ValueError, match="no timed signup"):
        medians_ms([Answer(NO_ANSWER, 0.1, 0.0)])


def test_an_answer_with_other_marks_is_refused() -> None:
    with pytest.raises(ValueError, match="expected 6 marks, got 2"):
        split(timed(1.0, [0.1, 0.2], 0.3))
