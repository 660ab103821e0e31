"""The JSON log lines: a verification code never reaches them, whatever quotes it."""

from __future__ import annotations

import logging

import orjson
import pytest

from shared.logs import JsonFormatter, redact


def line(msg: str, *args: object, **extra: object) -> dict[str, object]:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    doc: dict[str, object] = orjson.loads(JsonFormatter("test").format(record))
    return doc


def test_a_secret_code_in_the_message_or_an_extra_field_is_redacted() -> None:
    doc = line(
        "fetched %s",
        "/v1/verify_email?email_id=7&secret_code=abc-DEF_123&x=1",
        url=('http://h/v1/verify_email?Secret_Code=zz9"quoted'),
    )
    assert doc["event"] == "fetched /v1/verify_email?email_id=7&secret_code=[redacted]&x=1"
    assert doc["url"] == 'http://h/v1/verify_email?Secret_Code=[redacted]"quoted'


@pytest.mark.parametrize(
    ("quoted", "shown"),
    [
        # aiohttp quotes a request line it refused as bytes: the refused byte may come
        # first, in the middle, or after the code.
        (
            r"b'GET /v?secret_code=\xe2\x80\xa6K3y-abc HTTP/1.1'",
            "b'GET /v?secret_code=[redacted] HTTP/1.1'",
        ),
        (
            r"b'GET /v?secret_code=K3y\xe2\x80\x8bSUFFIX&e=1'",
            "b'GET /v?secret_code=[redacted]&e=1'",
        ),
        ("/v?x=1&secret_code%3DK3y-abc", "/v?x=1&secret_code%3D[redacted]"),
    ],
)
def test_no_part_of_a_code_survives_whatever_surrounds_it(quoted: str, shown: str) -> None:
    assert line("refused %s", quoted)["event"] == f"refused {shown}"


def test_a_line_without_a_code_is_left_alone() -> None:
    assert redact('{"event":"signup","secret":"no"}') == '{"event":"signup","secret":"no"}'
    assert line("secret_code is a field name", n=1)["event"] == "secret_code is a field name"
