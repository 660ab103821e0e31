"""Structured logs: one JSON object a line, with the service name and the request id.

The request id travels in a context variable, so every line written while handling a
request or a task carries it without being passed around.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


# A verification link's code, wherever a line quotes a URL (a request line aiohttp could
# not parse, say): the link may never have been used, and would still work. The value runs
# to the next parameter, space or quote; a byte the parser refused, quoted as `\xe2` in the
# middle of the code, is part of it. `=` may come percent-encoded.
_SECRET_PARAM = re.compile(r"(secret_code(?:=|%3D))[^&\s\"']*", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the value of every `secret_code=` parameter replaced."""
    if "secret_code" not in text.lower():
        return text
    return _SECRET_PARAM.sub(r"\1[redacted]", text)


def _redacted(value: Any) -> Any:
    """`value` with redact() applied to every string in it, before it is serialised (the
    JSON text itself cannot be edited safely: a quote in it is escaped)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    if value is None or isinstance(value, int | float):
        return value
    return redact(str(value))


class ClientMistakes(logging.Filter):
    """aiohttp logs a request it cannot parse (answered 400: the client's mistake, not the
    server's) as an error, with a traceback that quotes the raw request; and a body that
    does not decode, which it meets again while draining it after the answer, as an
    unhandled exception. Such a record becomes a warning (one logged lower stays lower)
    carrying in `error` the exception's name and the parser's reason, with no traceback
    and none of the bytes the parser quotes: those may be a body. A signup whose
    Content-Length counts characters instead of bytes, or that has none, leaves its tail,
    or all of it, password included, to be parsed as the next request line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and not isinstance(exc, HttpProcessingError):
            exc = exc.__cause__  # a body that failed to decode, met again after the answer
        if isinstance(exc, HttpProcessingError) and exc.code < 500:
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = None
            reason = parser_reason(exc.message)
            record.error = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        return True


def parser_reason(message: str) -> str:
    """The reason in an HTTP parser's message without the input it quotes: llhttp's
    messages are the reason, a colon, then the raw bytes; aiohttp's own put the bytes
    (or a header's name or value) after the reason too. A first line that still quotes
    something gives nothing."""
    first = message.split(":", 1)[0].strip()
    return "" if any(c in first for c in "'\"\\") else first[:200]


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "event": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid is not None:
            doc["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        line = orjson.dumps(doc, default=str).decode()
        if "secret_code" not in line.lower():  # the rule: one look at the line, no more
            return line
        return orjson.dumps(_redacted(doc)).decode()


def setup(service: str, level: str = "INFO") -> None:
    """Route the root logger to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log duplicates our request metrics and logs every request at INFO.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientMistakes) for f in server.filters):
        server.addFilter(ClientMistakes())
