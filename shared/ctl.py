"""`outboxctl`: the operator's tool for the pipeline's state and its dead letters.

    outboxctl status [--json]
    outboxctl dead list [--limit N] [--reason R] [--task T] [--newest-first] [--json]
    outboxctl dead show ID [--json]
    outboxctl dead replay (ID... | --all | --reason R | --task T) [--yes] [--dry-run] [--quiet]
    outboxctl dead purge (ID... | --all | --older-than 7d) [--yes] [--dry-run] [--quiet]
    outboxctl dead restore-lost [--older-than 10m] [--yes] [--dry-run] [--quiet]

Configured by DATABASE_URL, REDIS_URL and QUEUE (default "default").

Exit codes: 0 when everything asked for was done (entries skipped because they carry no
decodable envelope do not count as failures); 1 when some items failed (including IDs not
found), the operator declined the confirmation, or Redis/Postgres could not be reached;
2 for usage and configuration errors (also: a bulk change without --yes when stdin is not
a terminal).

The dead-letter stream is always read in pages (XRANGE ... COUNT), never all at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import orjson
import redis.exceptions as redis_errors
from pydantic import Field
from pydantic_settings import BaseSettings
from tqdm import tqdm

from relay.maintenance import BACKLOG_COUNT_CAP, REFUSED_ROWS
from relay.publisher import refuses_every_write
from shared.connections import create_pool, create_redis
from shared.constants import DEFAULT_QUEUE, ENVELOPE_FIELD, RETRY_PARKING_CONSUMER, dedupe_key
from shared.envelope import Envelope
from shared.errors import ConfigError, EnvelopeError
from shared.outbox import dead_letter_error
from shared.settings import SETTINGS_CONFIG, PostgresUrl, QueueName, RedisUrl, load
from worker_service.queue import StreamQueue

# No monitor thread (tqdm starts one even for a disabled bar, and never stops it): it only
# tunes the refresh of bars that stall, and a thread of its own was one more that could
# take the Ctrl-C meant for the prompt.
tqdm.monitor_interval = 0

PROG = "outboxctl"
PAGE_SIZE = 500  # dead letters read per XRANGE
CONNECT_TIMEOUT = 10.0
ERROR_WIDTH = 60  # characters of the error shown by `dead list`
_MAX_SEQ = 2**64 - 1
# ASCII digits only, matched whole (fullmatch): \d takes other scripts' digits, and $ a
# trailing newline. At most 20 significant digits a part (2**64 - 1 has 20): int() refuses
# more than 4,300.
_STREAM_ID = re.compile(r"0*([0-9]{1,20})-0*([0-9]{1,20})")
_DURATION = re.compile(r"([0-9]+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


class CtlSettings(BaseSettings):
    """Only what the tool needs, so unrelated service variables cannot break it."""

    model_config = SETTINGS_CONFIG

    database_url: PostgresUrl = Field(description="Postgres DSN.")
    redis_url: RedisUrl = Field(description="Redis URL carrying the streams.")
    queue: QueueName = DEFAULT_QUEUE


class CtlError(Exception):
    """An expected failure: printed as one line, then the process exits with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _where(url: str) -> str:
    """host:port of a URL, never its credentials."""
    parts = urlsplit(url)
    if parts.hostname is None:
        return parts.path or parts.scheme
    return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname


def _s(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# -- connections ---------------------------------------------------------------------------


class Session:
    """Connections opened on first use: `dead list` never needs Postgres."""

    def __init__(self, cfg: CtlSettings) -> None:
        self.cfg = cfg
        self._redis: Any = None
        self._pool: asyncpg.Pool[Any] | None = None
        self._queue: StreamQueue | None = None

    async def redis(self) -> Any:
        if self._redis is None:
            client = create_redis(self.cfg.redis_url, socket_timeout=30)
            try:
                await client.ping()
            except (redis_errors.RedisError, OSError) as e:
                with contextlib.suppress(Exception):
                    await client.aclose()
                raise CtlError(
                    f"cannot reach Redis at {_where(self.cfg.redis_url)}: {_one_line(e)}"
                ) from None
            self._redis = client
        return self._redis

    async def queue(self) -> StreamQueue:
        if self._queue is None:
            self._queue = StreamQueue(await self.redis(), self.cfg.queue)
        return self._queue

    async def pool(self) -> asyncpg.Pool[Any]:
        if self._pool is None:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    self._pool = await create_pool(self.cfg.database_url, min_size=1, max_size=2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                raise CtlError(
                    f"cannot reach Postgres at {_where(self.cfg.database_url)}: {_one_line(e)}"
                ) from None
        return self._pool

    async def close(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5)


# -- dead letters --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    raw: dict[bytes, bytes]

    def text(self, name: str) -> str:
        return _s(self.raw.get(name.encode(), b""))

    @property
    def envelope(self) -> bytes | None:
        return self.raw.get(ENVELOPE_FIELD.encode())

    @property
    def attempts(self) -> int | None:
        try:
            return int(self.text("attempts"))
        except ValueError:
            return None

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "failed_at": self.text("failed_at"),
            "task_type": self.text("task_type"),
            "reason": self.text("reason"),
            "attempts": self.attempts,
            "event_id": self.text("event_id"),
            "error": self.text("error"),
            "original_id": self.text("original_id"),
            "enqueued_at": self.text("enqueued_at"),
            "has_envelope": self.envelope is not None,
        }

    def original_fields(self) -> dict[str, Any]:
        try:
            doc = orjson.loads(self.raw.get(b"fields", b"{}"))
        except orjson.JSONDecodeError:
            return {"(undecodable)": self.text("fields")}
        return doc if isinstance(doc, dict) else {"(value)": doc}


def _next_id(sid: str) -> str:
    ms, seq = (int(p) for p in sid.split("-"))
    return f"{ms + 1}-0" if seq >= _MAX_SEQ else f"{ms}-{seq + 1}"


def _prev_id(sid: str) -> str:
    ms, seq = (int(p) for p in sid.split("-"))
    if seq > 0:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{_MAX_SEQ}" if ms > 0 else ""


async def scan_dead(
    client: Any,
    key: str,
    *,
    start: str = "-",
    end: str = "+",
    newest_first: bool = False,
    page: int = PAGE_SIZE,
) -> AsyncIterator[DeadLetter]:
    """Every dead letter between start and end, a page of XRANGE at a time.

    The cursor moves past the last id seen, so entries deleted behind it (by a replay or a
    purge in progress) do not disturb the scan.
    """
    lo, hi = start, end
    while True:
        if newest_first:
            batch = await client.xrevrange(key, max=hi, min=lo, count=page)
        else:
            batch = await client.xrange(key, min=lo, max=hi, count=page)
        for sid, fields in batch:
            yield DeadLetter(_s(sid), dict(fields))
        if len(batch) < page:
            return
        last = _s(batch[-1][0])
        if newest_first:
            hi = _prev_id(last)
            if not hi:
                return
        else:
            lo = _next_id(last)


async def fetch_dead(client: Any, key: str, dead_id: str) -> DeadLetter | None:
    found = await client.xrange(key, min=dead_id, max=dead_id, count=1)
    if not found:
        return None
    sid, fields = found[0]
    return DeadLetter(_s(sid), dict(fields))


@dataclass
class Selection:
    """Which dead letters a replay or purge acts on: IDs, or everything matching."""

    ids: list[str] = field(default_factory=list)
    everything: bool = False
    reason: str | None = None
    task: str | None = None
    older_than: timedelta | None = None

    @property
    def bulk(self) -> bool:
        return not self.ids

    def matches(self, dl: DeadLetter) -> bool:
        if self.reason is not None and dl.text("reason") != self.reason:
            return False
        return self.task is None or dl.text("task_type") == self.task

    def end_bound(self, now: float) -> str:
        """The last id a bulk selection can reach (older_than: the cutoff from `now`, in
        seconds of Redis's clock, which stamped the ids)."""
        if self.older_than is None:
            return "+"
        cutoff_ms = int((now - self.older_than.total_seconds()) * 1000)
        return f"{cutoff_ms - 1}-{_MAX_SEQ}" if cutoff_ms > 0 else ""

    def describe(self) -> str:
        parts = []
        if self.reason is not None:
            parts.append(f"reason={self.reason}")
        if self.task is not None:
            parts.append(f"task={self.task}")
        if self.older_than is not None:
            parts.append(f"older than {_age(self.older_than.total_seconds())}")
        return ", ".join(parts) or "all"


async def _count_bulk(client: Any, key: str, sel: Selection, quiet: bool) -> tuple[int, str]:
    """How many dead letters match, and the last matching id (the bound of the change).

    Processing stops at that id, so what arrives after the confirmation is left alone.
    Every dead letter up to the bound is read (about 2.5 s per 300,000): a progress bar
    counts them against the stream's length.
    """
    # Redis's clock, not this machine's: an operator's clock ahead of the server's would
    # take younger dead letters than asked for.
    seconds, micros = await client.time()
    end = sel.end_bound(seconds + micros / 1e6)
    if not end:
        return 0, ""
    count, last = 0, ""
    async for dl in _scan_shown(client, key, quiet, "counting", end=end):
        if sel.matches(dl):
            count += 1
            last = dl.id
    return count, last


async def _scan_shown(
    client: Any, key: str, quiet: bool, desc: str, *, end: str = "+"
) -> AsyncIterator[DeadLetter]:
    """scan_dead(), with a progress bar against the stream's length (on a terminal)."""
    bar = _progress(await client.xlen(key), quiet, desc)
    try:
        async for dl in scan_dead(client, key, end=end):
            bar.update(1)
            yield dl
    finally:
        bar.close()


async def _iter_selected(
    client: Any, key: str, sel: Selection, last: str, missing: Callable[[str], None]
) -> AsyncIterator[DeadLetter]:
    if sel.bulk:
        async for dl in scan_dead(client, key, end=last):
            if sel.matches(dl):
                yield dl
        return
    for dead_id in sel.ids:
        found = await fetch_dead(client, key, dead_id)
        if found is None:
            missing(dead_id)
        else:
            yield found


async def _confirm(question: str, assume_yes: bool) -> None:
    if assume_yes:
        return
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():
        raise CtlError(f"{question}: not confirmed (stdin is not a terminal); pass --yes", code=2)
    print(f"{question}? [y/N] ", end="", file=sys.stderr, flush=True)
    await _line_ready(stdin)
    if stdin.readline().strip().lower() not in ("y", "yes"):
        raise CtlError("aborted; nothing changed", code=1)


async def _line_ready(stream: Any) -> None:
    """Until the terminal has a line (or end of input) to read. A readline() blocking the
    event loop would not see the first Ctrl-C: asyncio takes it to cancel the main task,
    which cannot run until a line comes."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # not a file (io.UnsupportedOperation is both)
        return
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    pressed = False

    def interrupted() -> None:
        nonlocal pressed
        pressed = True
        if not ready.done():
            ready.set_exception(KeyboardInterrupt())

    # Ctrl-C through the event loop's wakeup fd (add_signal_handler sets one). The handler
    # asyncio.run() installs runs only once the main thread runs Python code again: a
    # SIGINT that another thread takes, or that lands just before the main thread goes
    # into epoll_wait, would leave the prompt waiting.
    previous = signal.getsignal(signal.SIGINT)
    try:
        loop.add_signal_handler(signal.SIGINT, interrupted)
        own_handler = True
    except (RuntimeError, ValueError):  # not in the main thread: as it was
        own_handler = False
    loop.add_reader(fd, readable)
    try:
        await ready
        # A Ctrl-C that came with the answer, in the loop's same turn, has its handler
        # called in the next one: it still wins over the answer.
        await asyncio.sleep(0)
    finally:
        loop.remove_reader(fd)
        if own_handler:
            loop.remove_signal_handler(signal.SIGINT)
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def _progress(total: int, quiet: bool, desc: str) -> Any:
    disable = quiet or total <= 1 or not sys.stderr.isatty()
    return tqdm(total=total, file=sys.stderr, disable=disable, unit="entry", desc=desc, leave=False)


def _say(line: str) -> None:
    tqdm.write(line, file=sys.stdout)


# -- status --------------------------------------------------------------------------------

# Counting stops at the relay's cap (relay/maintenance.py), so the backlog and in-flight
# counts cost the same however large they are (partial indexes). The oldest unpublished
# age is the relay's gauge's: rows Redis refused count from their creation. The dead-lettered count
# has no index to use: it reads the table, about 160 ms per 3 million rows (a table
# `OUTBOX_RETENTION_SECONDS` keeps small; an index for one operator count would cost every
# signup's insert). Counts are for this queue only.
_STATUS = f"""
SELECT
  (SELECT count(*) FROM (SELECT 1 FROM outbox
                         WHERE published_at IS NULL AND dead_lettered_at IS NULL
                           AND queue = $2
                         LIMIT $1) AS capped) AS backlog,
  (SELECT extract(epoch FROM now() - available_at) FROM outbox
   WHERE published_at IS NULL AND available_at <= now() AND dead_lettered_at IS NULL
     AND queue = $2
   ORDER BY available_at LIMIT 1) AS oldest_due,
  (SELECT count(*) FROM (SELECT 1 FROM outbox WHERE {REFUSED_ROWS} AND queue = $2
                         LIMIT $1) AS capped) AS refused,
  (SELECT ARRAY[extract(epoch FROM now() - created_at)::text, last_error] FROM outbox
   WHERE {REFUSED_ROWS} AND queue = $2
   ORDER BY created_at LIMIT 1) AS oldest_refused,
  (SELECT count(*) FROM (SELECT 1 FROM outbox
                         WHERE published_at IS NOT NULL AND completed_at IS NULL
                           AND dead_lettered_at IS NULL AND queue = $2
                         LIMIT $1) AS capped) AS in_flight,
  (SELECT count(*) FROM (SELECT 1 FROM outbox
                         WHERE dead_lettered_at IS NOT NULL AND completed_at IS NULL
                           AND queue = $2
                         LIMIT $1) AS capped) AS dead_lettered
"""  # noqa: S608 - built from constants, no input


async def collect_status(session: Session) -> dict[str, Any]:
    pool = await session.pool()
    queue = await session.queue()
    row = await pool.fetchrow(_STATUS, BACKLOG_COUNT_CAP, session.cfg.queue)
    assert row is not None
    stats = await queue.stats()
    client: Any = queue.redis
    consumers: list[dict[str, Any]] = []
    group_exists = True
    try:
        infos = await client.xinfo_consumers(queue.stream, queue.group)
    except redis_errors.ResponseError:  # no stream, or no group yet
        infos, group_exists = [], False
    for c in infos:
        consumers.append(
            {"name": _s(c["name"]), "pending": int(c["pending"]), "idle_ms": int(c["idle"])}
        )
    refused = row["oldest_refused"]  # [age, last_error] of the oldest row Redis refused
    ages = [float(a) for a in (row["oldest_due"], refused and refused[0]) if a is not None]
    lag = int(stats["lag"])
    return {
        "queue": session.cfg.queue,
        "outbox": {
            "count_cap": BACKLOG_COUNT_CAP,
            "backlog": int(row["backlog"]),
            "oldest_unpublished_age_seconds": max(ages) if ages else None,
            "refused": int(row["refused"]),
            "oldest_refused_error": refused[1] if refused else None,
            "in_flight": int(row["in_flight"]),
            "dead_lettered": int(row["dead_lettered"]),
        },
        "redis": {
            "stream": queue.stream,
            "group": queue.group,
            "group_exists": group_exists,
            "stream_length": int(stats["stream_length"]),
            "pending": int(stats["pending"]),
            "oldest_pending_age_seconds": float(stats["oldest_pending_age"]),
            "lag": None if lag < 0 else lag,
            "consumers": consumers,
            "dead_letter_stream": queue.dead,
            "dead_letters": int(stats["dead_letters"]),
        },
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    for unit, size, sub, sub_size in (
        ("d", 86_400, "h", 3600),
        ("h", 3600, "m", 60),
        ("m", 60, "s", 1),
    ):
        if s >= size:
            return f"{s // size}{unit} {(s % size) // sub_size}{sub}"
    return f"{s}s"  # pragma: no cover


def _capped(n: int, cap: int) -> str:
    return f"{n}+" if n >= cap else str(n)


def _refused(outbox: dict[str, Any], cap: int) -> str:
    n = _capped(outbox["refused"], cap)
    error = outbox["oldest_refused_error"]
    return f"{n} (oldest: {' '.join(error.split())[:100]})" if error else n


def render_status(st: dict[str, Any]) -> str:
    o, r = st["outbox"], st["redis"]
    cap = o["count_cap"]
    rows = [
        (f"Postgres outbox (queue {st['queue']})", ""),
        ("  unpublished backlog", _capped(o["backlog"], cap)),
        ("  oldest unpublished age", _age(o["oldest_unpublished_age_seconds"])),
        ("  refused by Redis, not yet published", _refused(o, cap)),
        ("  in flight (published, not completed)", _capped(o["in_flight"], cap)),
        ("  dead-lettered", _capped(o["dead_lettered"], cap)),
        (f"Redis stream {r['stream']}", ""),
        ("  length", str(r["stream_length"])),
        (f"  group {r['group']}", "present" if r["group_exists"] else "missing"),
        ("  pending", str(r["pending"])),
        (
            "  held longest without renewal",
            _age(r["oldest_pending_age_seconds"] if r["pending"] else None),
        ),
        ("  lag", "n/a" if r["lag"] is None else str(r["lag"])),
        (f"Redis dead letters {r['dead_letter_stream']}", str(r["dead_letters"])),
    ]
    width = max(len(k) for k, _ in rows) + 2
    lines = [f"{k:<{width}}{v}".rstrip() for k, v in rows]
    lines.append(f"Consumers ({len(r['consumers'])})")
    if r["consumers"]:
        name_w = max(8, *(len(c["name"]) for c in r["consumers"])) + 2
        lines.append(f"  {'NAME':<{name_w}}{'PENDING':>8}  IDLE")
        for c in r["consumers"]:
            note = "  (retry parking)" if c["name"] == RETRY_PARKING_CONSUMER else ""
            lines.append(
                f"  {c['name']:<{name_w}}{c['pending']:>8}  {_age(c['idle_ms'] / 1000)}{note}"
            )
    return "\n".join(lines)


async def cmd_status(session: Session, args: argparse.Namespace) -> int:
    st = await collect_status(session)
    if args.json:
        print(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_status(st))
    return 0


# -- dead list / show ----------------------------------------------------------------------


def _short_time(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso or "-"


def _truncate(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


async def cmd_dead_list(session: Session, args: argparse.Namespace) -> int:
    queue = await session.queue()
    sel = Selection(reason=args.reason, task=args.task)
    limit: int = args.limit
    shown, more = 0, False
    header = f"{'ID':<16} {'FAILED_AT':<19} {'TASK':<20} {'REASON':<16} {'TRIES':>5}"
    header += f" {'EVENT_ID':<36} ERROR"
    if args.json:
        sys.stdout.write("[")
    async for dl in scan_dead(queue.redis, queue.dead, newest_first=args.newest_first):
        if not sel.matches(dl):
            continue
        if limit and shown >= limit:
            more = True
            break
        if args.json:
            sys.stdout.write(
                ("\n  " if shown == 0 else ",\n  ") + orjson.dumps(dl.summary()).decode()
            )
        else:
            if shown == 0:
                print(header)
            attempts = dl.attempts
            print(
                f"{dl.id:<16} {_short_time(dl.text('failed_at')):<19} "
                f"{dl.text('task_type') or '-':<20} {dl.text('reason') or '-':<16} "
                f"{'-' if attempts is None else attempts:>5} {dl.text('event_id') or '-':<36} "
                f"{_truncate(dl.text('error'), ERROR_WIDTH)}"
            )
        shown += 1
    if args.json:
        sys.stdout.write("\n]\n" if shown else "]\n")
    elif shown == 0:
        print("no dead letters" + ("" if sel.describe() == "all" else f" ({sel.describe()})"))
    if more:
        print(f"{PROG}: more dead letters match; --limit 0 lists them all", file=sys.stderr)
    return 0


_OUTBOX_ROW = """
SELECT id, event_id, task_type, queue, payload, headers, created_at, available_at,
       published_at, stream_id, publish_attempts, last_error, completed_at, dead_lettered_at
FROM outbox WHERE event_id = $1::uuid
"""


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _valid_uuid(text: str) -> str | None:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


async def cmd_dead_show(session: Session, args: argparse.Namespace) -> int:
    dead_id = _check_ids([args.id])[0]
    queue = await session.queue()
    dl = await fetch_dead(queue.redis, queue.dead, dead_id)
    if dl is None:
        raise CtlError(f"no dead letter {dead_id} in {queue.dead}")
    envelope: Any = None
    envelope_error: str | None = None
    raw = dl.envelope
    if raw is None:
        envelope_error = f"no {ENVELOPE_FIELD!r} field"
    else:
        try:
            envelope = orjson.loads(raw)
            Envelope.decode({ENVELOPE_FIELD.encode(): raw})
        except orjson.JSONDecodeError as e:
            envelope, envelope_error = _s(raw), f"not JSON: {e}"
        except EnvelopeError as e:
            envelope_error = str(e)
    event_id = _valid_uuid(dl.text("event_id"))
    if event_id is None and isinstance(envelope, dict):
        event_id = _valid_uuid(str(envelope.get("id", "")))
    outbox: dict[str, Any] | None = None
    if event_id is not None:
        pool = await session.pool()
        rec = await pool.fetchrow(_OUTBOX_ROW, event_id)
        if rec is not None:
            outbox = {k: _jsonable(v) for k, v in rec.items()}
    fields = dl.original_fields()
    if raw is not None and envelope_error is None:
        fields.pop(ENVELOPE_FIELD, None)  # shown decoded below
    doc = {
        "dead_letter": dl.summary(),
        "envelope": envelope,
        "envelope_error": envelope_error,
        "original_fields": fields,
        "outbox": outbox,
    }
    if args.json:
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return 0
    summary = dl.summary()
    for key in ("id", "original_id", "reason", "task_type", "attempts", "event_id"):
        print(f"{key.replace('_', ' '):<13} {summary[key] if summary[key] != '' else '-'}")
    for key in ("enqueued_at", "failed_at"):
        print(f"{key.replace('_', ' '):<13} {summary[key] or '-'}")
    print("error:")
    print(_indent(summary["error"] or "-"))
    print("envelope:" + (f" (invalid: {envelope_error})" if envelope_error else ""))
    if envelope is None:
        print("  -")
    elif isinstance(envelope, str):
        print(_indent(envelope))
    else:
        print(_indent(orjson.dumps(envelope, option=orjson.OPT_INDENT_2).decode()))
    if fields:
        print("other original fields:")
        print(_indent(orjson.dumps(fields, option=orjson.OPT_INDENT_2).decode()))
    print("outbox row:" + ("" if outbox else " none"))
    if outbox:
        width = max(len(k) for k in outbox) + 1
        for k, v in outbox.items():
            shown = orjson.dumps(v).decode() if isinstance(v, dict | list) else v
            print(f"  {k:<{width}} {'-' if shown is None else shown}")
    return 0


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# -- replay --------------------------------------------------------------------------------

# Step 1: the row becomes "in flight" again. published_at = now() keeps the reconciler from
# republishing it before step 3 records the new stream id.
_REVIVE = """
UPDATE outbox SET dead_lettered_at = NULL, last_error = NULL, published_at = now()
WHERE event_id = $1::uuid AND completed_at IS NULL
RETURNING stream_id
"""
# Undoes step 1 when step 2 did not run: the row goes back to dead-lettered, as the worker
# left it, so the reconciler does not publish it once its old entry is trimmed (beside the
# dead letter, which a later replay would add again). Only while the row still names the
# entry step 1 found: another replay of the same dead letter that went through meanwhile
# has pointed it at its new entry (step 3), and its event is back in the stream.
_REBURY = """
UPDATE outbox SET dead_lettered_at = now(), last_error = $2
WHERE event_id = $1::uuid AND completed_at IS NULL AND dead_lettered_at IS NULL
  AND stream_id IS NOT DISTINCT FROM $3
"""
# Step 3: point the reconciler at the new entry (and undo a re-bury by another replay that
# checked for the dead letter before this one's script took it). A mark that names the new
# entry is the worker's: it ran the replayed entry and gave up on it again before this
# step, and the event is in the dead letters once more. That mark stays.
_TRACK = """
UPDATE outbox SET stream_id = $2, published_at = now(),
    dead_lettered_at = CASE WHEN stream_id = $2 THEN dead_lettered_at END,
    last_error = CASE WHEN stream_id = $2 THEN last_error END
WHERE event_id = $1::uuid AND completed_at IS NULL
"""


@dataclass
class Tally:
    done: int = 0
    skipped: int = 0
    failed: int = 0


async def replay_one(pool: asyncpg.Pool[Any], queue: StreamQueue, dl: DeadLetter) -> str | None:
    """Put one dead letter back on the stream; the new stream id, or None if another
    replay took it first (the script re-adds only what its own XDEL removed).

    Order, for crash safety: Postgres first (clear dead_lettered_at), then Redis (XADD the
    envelope and XDEL the dead letter in one script), then Postgres again (new stream_id).
    - Step 2 refused (a Redis replica after a failover, memory full) or interrupted
      (Ctrl-C, a timeout): if the dead letter is still there, the script did not run, and
      the row is marked dead-lettered again.
    - Crash after step 1, or step 2 failing where Redis cannot be asked: the row is in
      flight with its old, acknowledged stream id and the dead letter is still there. Once
      that old entry is trimmed the relay's reconciler publishes the event again; the
      worst case is a duplicate (the operator replays again), never a loss.
    - Crash after step 2 (or step 3 failing): the row is in flight, the task is in the
      stream and the worker completes it (its UPDATE sets completed_at). If the
      reconciler gets there first, the dedupe key the script set names the new entry, and
      its republish takes that one instead of adding another. A Ctrl-C waits for all
      three steps (CtrlC).
    The other order (Redis first) can leave the row dead-lettered while the task is back
    in the stream. The worker would still complete it, but if Redis lost the entry the
    reconciler would skip the row (it ignores dead-lettered rows) and the dead letter is
    already gone: the task would be lost for good.
    """
    raw = dl.envelope
    assert raw is not None
    envelope = Envelope.decode({ENVELOPE_FIELD.encode(): raw})
    found = await pool.fetchrow(_REVIVE, envelope.event_id)
    try:
        new_id = await queue.replay_dead(dl.id, raw, envelope.event_id)
    except BaseException:
        if found is not None:
            await _rebury_if_not_replayed(pool, queue, dl, envelope.event_id, found["stream_id"])
        raise
    if new_id is not None:
        await pool.execute(_TRACK, envelope.event_id, new_id)
    elif found is not None:
        # Someone else took the dead letter first. A purge (its row delete skipped the row
        # this revive had just cleared) must not leave the event in flight, for the
        # reconciler to publish; a concurrent replay's step 3 clears the mark again.
        await _rebury(pool, dl, envelope.event_id, found["stream_id"])
    return new_id


T = TypeVar("T")


class CtrlC:
    """Steps that must not be cut in the middle. A Ctrl-C (the main task's cancellation)
    that comes during one waits for it to finish; the caller stops before the next
    (`check()`). A replay cut off between its steps left its row in flight beside its
    dead letter (the reconciler would publish the event, and a second replay of the dead
    letter run it again), or its entry re-added with the row still naming the old one.
    A second Ctrl-C stops at once, as asyncio.run() makes it."""

    def __init__(self) -> None:
        self.pressed = False

    async def whole(self, aw: Awaitable[T]) -> T:
        task = asyncio.ensure_future(aw)
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                self.pressed = True
                if task.done():  # in the same turn as the Ctrl-C: its outcome, not lost
                    return task.result()

    def check(self) -> None:
        if self.pressed:
            raise asyncio.CancelledError


async def _rebury(
    pool: asyncpg.Pool[Any], dl: DeadLetter, event_id: str, stream_id: str | None
) -> None:
    error = dead_letter_error(dl.text("reason"), dl.text("error"))
    await pool.execute(_REBURY, event_id, error, stream_id)


async def _rebury_if_not_replayed(
    pool: asyncpg.Pool[Any],
    queue: StreamQueue,
    dl: DeadLetter,
    event_id: str,
    stream_id: str | None,
) -> None:
    """Best effort: where Redis cannot say, the row stays in flight (see replay_one)."""
    with contextlib.suppress(Exception):
        if await queue.redis.xrange(queue.dead, dl.id, dl.id, count=1):
            await _rebury(pool, dl, event_id, stream_id)


def _skip_reason(dl: DeadLetter) -> str | None:
    raw = dl.envelope
    if raw is None:
        return f"no envelope (no {ENVELOPE_FIELD!r} field; reason {dl.text('reason') or '-'})"
    try:
        Envelope.decode({ENVELOPE_FIELD.encode(): raw})
    except EnvelopeError as e:
        return f"envelope does not decode: {_one_line(e)}"
    return None


# Connection-level failures end the run (every next item would fail the same way);
# anything else fails the one item.
_FATAL = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    OSError,
)


async def cmd_dead_replay(session: Session, args: argparse.Namespace) -> int:
    sel = _selection(args, allow_filters=True)
    queue = await session.queue()
    client: Any = queue.redis
    last = ""
    if sel.bulk:
        total, last = await _count_bulk(client, queue.dead, sel, args.quiet)
        if total == 0:
            print(f"no dead letters match ({sel.describe()})")
            return 0
        if not args.dry_run:
            await _confirm(f"replay {total} dead letter(s) ({sel.describe()})", args.yes)
    else:
        total = len(sel.ids)
    pool = None if args.dry_run else await session.pool()
    tally = Tally()

    def missing(dead_id: str) -> None:
        tally.failed += 1
        _say(f"failed {dead_id}: no such dead letter")

    verb = "would replay" if args.dry_run else "replayed"
    bar = _progress(total, args.quiet, "replay")
    ctrl_c = CtrlC()
    try:
        async for dl in _iter_selected(client, queue.dead, sel, last, missing):
            ctrl_c.check()
            bar.update(1)
            why = _skip_reason(dl)
            if why is not None:
                tally.skipped += 1
                _say(f"skipped {dl.id}: {why}")
                continue
            if pool is None:
                tally.done += 1
                if not args.quiet:
                    _say(f"{verb} {dl.id} (event {dl.text('event_id') or '-'})")
                continue
            try:
                new_id = await ctrl_c.whole(replay_one(pool, queue, dl))
            except _FATAL:
                tally.failed += 1
                raise
            except (redis_errors.RedisError, asyncpg.PostgresError) as e:
                tally.failed += 1
                if isinstance(e, redis_errors.ResponseError) and refuses_every_write(e):
                    raise  # every next item would be refused the same way
                _say(f"failed {dl.id}: {_one_line(e)}")
                continue
            if new_id is None:
                tally.skipped += 1
                _say(f"skipped {dl.id}: replayed or purged by someone else meanwhile")
            else:
                tally.done += 1
                if not args.quiet:
                    _say(f"{verb} {dl.id} -> {new_id} (event {dl.text('event_id') or '-'})")
        ctrl_c.check()
    finally:
        bar.close()
        print(
            f"{'dry run: ' if args.dry_run else ''}{verb} {tally.done}, "
            f"skipped {tally.skipped}, failed {tally.failed}"
        )
    return 1 if tally.failed else 0


# -- purge ---------------------------------------------------------------------------------


# A purged dead letter is an event given up on for good: its outbox row goes with it, so
# that nothing (the reconciler, an operator requeueing dead-lettered rows after Redis lost
# its data) sends it later, and the table does not keep it for ever.
_FORGET = """
DELETE FROM outbox
WHERE event_id = ANY($1::uuid[]) AND dead_lettered_at IS NOT NULL AND completed_at IS NULL
"""


def _event_ids(letters: list[DeadLetter]) -> list[str]:
    found = (_valid_uuid(dl.text("event_id")) for dl in letters)
    return [event_id for event_id in found if event_id is not None]


async def cmd_dead_purge(session: Session, args: argparse.Namespace) -> int:
    """Postgres first, then Redis: a purge cut off in between leaves dead letters whose rows
    are gone, and running it again finishes it; the other order would leave rows whose
    dead letters are gone, which no later purge would find."""
    sel = _selection(args, allow_filters=False)
    queue = await session.queue()
    client: Any = queue.redis
    pool = None if args.dry_run else await session.pool()
    tally = Tally()
    verb = "would purge" if args.dry_run else "purged"

    async def purge(letters: list[DeadLetter]) -> int:
        if pool is None or not letters:
            return len(letters)
        await pool.execute(_FORGET, _event_ids(letters))
        return int(await client.xdel(queue.dead, *(dl.id for dl in letters)))

    if not sel.bulk:
        bar = _progress(len(sel.ids), args.quiet, "purge")
        try:
            for start in range(0, len(sel.ids), PAGE_SIZE):
                chunk = sel.ids[start : start + PAGE_SIZE]
                async with client.pipeline(transaction=False) as pipe:
                    for dead_id in chunk:
                        pipe.xrange(queue.dead, min=dead_id, max=dead_id, count=1)
                    found = [
                        DeadLetter(_s(entries[0][0]), entries[0][1])
                        for entries in await pipe.execute()
                        if entries
                    ]
                await purge(found)
                present = {dl.id for dl in found}
                for dead_id in chunk:
                    bar.update(1)
                    if dead_id in present:
                        tally.done += 1
                        if not args.quiet:
                            _say(f"{verb} {dead_id}")
                    else:
                        tally.failed += 1
                        _say(f"failed {dead_id}: no such dead letter")
        finally:
            bar.close()
            print(f"{verb} {tally.done}, failed {tally.failed}")
        return 1 if tally.failed else 0

    total, last = await _count_bulk(client, queue.dead, sel, args.quiet)
    if total == 0:
        print(f"no dead letters match ({sel.describe()})")
        return 0
    if not args.dry_run:
        await _confirm(f"purge {total} dead letter(s) ({sel.describe()})", args.yes)
    bar = _progress(total, args.quiet, "purge")
    batch: list[DeadLetter] = []

    async def flush() -> None:
        tally.done += await purge(batch)
        bar.update(len(batch))
        batch.clear()

    try:
        async for dl in scan_dead(client, queue.dead, end=last):
            if sel.matches(dl):
                batch.append(dl)
                if len(batch) >= PAGE_SIZE:
                    await flush()
        await flush()
    finally:
        bar.close()
        print(f"{'dry run: ' if args.dry_run else ''}{verb} {tally.done}, failed {tally.failed}")
    return 0


# -- restore-lost --------------------------------------------------------------------------

# Events given up on (dead-lettered) in Postgres. One never published has no dead letter
# (migration 002's rows); one dead-lettered moments ago may have its dead letter still on
# the way (the worker writes Postgres first): --older-than leaves those alone.
_DEAD_LETTERED_ROWS = """
SELECT event_id::text AS event_id FROM outbox
WHERE dead_lettered_at IS NOT NULL AND completed_at IS NULL AND published_at IS NOT NULL
  AND queue = $1 AND dead_lettered_at < now() - make_interval(secs => $2)
ORDER BY dead_lettered_at
"""
# Unpublished again: the relay publishes them as it does a new signup's event.
_RESTORE = """
UPDATE outbox SET dead_lettered_at = NULL, last_error = NULL, published_at = NULL,
    stream_id = NULL, available_at = now()
WHERE event_id = ANY($1::uuid[]) AND dead_lettered_at IS NOT NULL AND completed_at IS NULL
"""


async def cmd_dead_restore_lost(session: Session, args: argparse.Namespace) -> int:
    """Events dead-lettered in Postgres whose dead letter Redis no longer has (lost with
    its data, or deleted by hand) are handed back to the relay. Those whose dead letter is
    there are replayed with `dead replay` instead."""
    queue = await session.queue()
    client: Any = queue.redis
    pool = await session.pool()
    present: set[str] = set()
    async for dl in _scan_shown(client, queue.dead, args.quiet, "reading dead letters"):
        if event_id := dl.text("event_id"):
            present.add(event_id)
    rows = await pool.fetch(_DEAD_LETTERED_ROWS, session.cfg.queue, args.older_than.total_seconds())
    lost = [r["event_id"] for r in rows if r["event_id"] not in present]
    if not lost:
        print("no dead-lettered event is missing from the dead letters")
        return 0
    what = f"{len(lost)} dead-lettered event(s) whose dead letters are gone"
    if args.dry_run:
        if not args.quiet:
            for event_id in lost:
                _say(f"would restore event {event_id}")
        print(f"dry run: would restore {what}")
        return 0
    await _confirm(f"restore {what}, to be published again", args.yes)
    # A dedupe key left (the dead letters deleted by hand, Redis's data kept) would make
    # the relay take an event for published already, with an entry long gone.
    for i in range(0, len(lost), PAGE_SIZE):
        chunk = lost[i : i + PAGE_SIZE]
        await client.delete(*(dedupe_key(e, session.cfg.queue) for e in chunk))
    status = await pool.execute(_RESTORE, lost)
    print(f"restored {int(status.split()[-1])}: the relay publishes them again")
    return 0


# -- arguments -----------------------------------------------------------------------------


def parse_duration(text: str) -> timedelta:
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number and one of s, m, h, d, w (e.g. 7d)"
        )
    try:
        return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    except OverflowError:
        raise argparse.ArgumentTypeError(f"duration too long: {text!r}") from None


def _positive_or_zero(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must be 0 (no limit) or more")
    return n


def _check_ids(ids: list[str]) -> list[str]:
    """The ids as Redis writes them (`05-0` is `5-0`: Redis takes both, and answers with
    the second), each once; a usage error names those that are no stream id."""
    canonical: list[str] = []
    bad: list[str] = []
    for text in ids:
        m = _STREAM_ID.fullmatch(text)
        ms, seq = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
        if 0 <= ms <= _MAX_SEQ and 0 <= seq <= _MAX_SEQ:
            canonical.append(f"{ms}-{seq}")
        else:
            bad.append(text)
    if bad:
        raise CtlError(f"not a stream id (want <ms>-<seq>): {', '.join(bad)}", code=2)
    return list(dict.fromkeys(canonical))


def _selection(args: argparse.Namespace, *, allow_filters: bool) -> Selection:
    reason = getattr(args, "reason", None)
    task = getattr(args, "task", None)
    older = getattr(args, "older_than", None)
    bulk_opts = [
        name
        for name, given in (
            ("--all", args.all),
            ("--reason", reason is not None),
            ("--task", task is not None),
            ("--older-than", older is not None),
        )
        if given
    ]
    what = "--all, --reason or --task" if allow_filters else "--all or --older-than"
    if args.ids and bulk_opts:
        raise CtlError(f"give either IDs or {what}, not both", code=2)
    if not args.ids and not bulk_opts:
        raise CtlError(f"give dead-letter IDs, or {what}", code=2)
    if args.all and len(bulk_opts) > 1:
        raise CtlError(f"--all cannot be combined with {', '.join(bulk_opts[1:])}", code=2)
    return Selection(
        ids=_check_ids(args.ids),
        everything=args.all,
        reason=reason,
        task=task,
        older_than=older,
    )


Command = Callable[[Session, argparse.Namespace], Awaitable[int]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect the outbox pipeline and manage its dead letters. "
        "Configured by DATABASE_URL, REDIS_URL and QUEUE (default 'default').",
        epilog="Exit codes: 0 ok, 1 some items failed or a server is unreachable, "
        "2 usage or configuration error.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = sub.add_parser("status", help="backlog, in-flight, pending, consumers, dead letters")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    dead = sub.add_parser("dead", help="list, show, replay, purge or restore-lost dead letters")
    dsub = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")

    lst = dsub.add_parser("list", help="one line per dead letter, oldest first")
    lst.add_argument(
        "--limit", type=_positive_or_zero, default=100, help="at most N (default 100; 0: all)"
    )
    lst.add_argument("--reason", help="only this reason (e.g. permanent_error, max_attempts)")
    lst.add_argument("--task", help="only this task type")
    lst.add_argument("--newest-first", action="store_true", help="newest first instead")
    lst.add_argument("--json", action="store_true", help="print a JSON array")
    lst.set_defaults(func=cmd_dead_list)

    show = dsub.add_parser("show", help="everything about one dead letter")
    show.add_argument("id", help="dead-letter stream id")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_dead_show)

    replay = dsub.add_parser(
        "replay",
        help="put dead letters back on the stream",
        description="Put dead letters back on the stream and mark their outbox rows in "
        "flight again. Entries without a decodable envelope are skipped (not a failure).",
    )
    replay.add_argument("ids", nargs="*", metavar="ID", help="dead-letter stream ids")
    replay.add_argument("--all", action="store_true", help="every dead letter")
    replay.add_argument("--reason", help="every dead letter with this reason")
    replay.add_argument("--task", help="every dead letter of this task type")
    _change_options(replay)
    replay.set_defaults(func=cmd_dead_replay)

    purge = dsub.add_parser("purge", help="delete dead letters")
    purge.add_argument("ids", nargs="*", metavar="ID", help="dead-letter stream ids")
    purge.add_argument("--all", action="store_true", help="every dead letter")
    purge.add_argument(
        "--older-than",
        type=parse_duration,
        metavar="DURATION",
        help="dead letters that failed longer ago than this (30m, 12h, 7d, 2w)",
    )
    _change_options(purge)
    purge.set_defaults(func=cmd_dead_purge)

    restore = dsub.add_parser(
        "restore-lost",
        help="publish again the events whose dead letters Redis lost",
        description="Events dead-lettered in Postgres whose dead letter is not in the "
        "dead-letter stream (Redis came back without its data) are marked unpublished, "
        "and the relay publishes them again. Run it once the cause of their failure is "
        "fixed; dead letters still in the stream are replayed with `dead replay`.",
    )
    restore.add_argument(
        "--older-than",
        type=parse_duration,
        default=timedelta(minutes=10),
        metavar="DURATION",
        help="only events dead-lettered longer ago than this (default 10m: a worker may"
        " be writing a dead letter right now)",
    )
    _change_options(restore)
    restore.set_defaults(func=cmd_dead_restore_lost)
    return parser


def _change_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no per-item lines")


# -- entry point ---------------------------------------------------------------------------


async def _run(func: Command, args: argparse.Namespace, cfg: CtlSettings) -> int:
    session = Session(cfg)
    try:
        return await func(session, args)
    except redis_errors.RedisError as e:
        raise CtlError(f"Redis error: {_one_line(e)}") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise CtlError(f"Postgres error: {_one_line(e)}") from None
    except BrokenPipeError:
        raise  # our reader went away (`| head`): not a connection of ours
    except OSError as e:
        raise CtlError(f"connection error: {_one_line(e)}") from None
    finally:
        await session.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        cfg = load(CtlSettings)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args.func, args, cfg))
    except CtlError as e:
        print(f"{PROG}: {e.message}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `outboxctl dead list | head`: end as a command killed by SIGPIPE does, quietly.
        # stdout points at /dev/null so that the interpreter's last flush does not fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
