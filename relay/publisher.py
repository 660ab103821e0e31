"""Claim due outbox rows with FOR UPDATE SKIP LOCKED, XADD them, mark them published.

Rows are selected by `published_at IS NULL`, never by `id > last_seen`: a transaction that
took a lower id can commit after one that took a higher id, and a cursor would skip it.
The claim, the XADD and the update happen while the rows are locked, so relays running
side by side never take the same row. If a relay dies after XADD but before its commit,
the next relay to take the row finds the event's dedupe key in Redis (set atomically with
the XADD by a Lua script) and records the existing stream id instead of adding it again.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import defaultdict
from typing import Any, NamedTuple

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import (
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)

from relay import metrics
from relay.settings import RelaySettings
from shared.connections import DbConn
from shared.constants import ENVELOPE_FIELD, dedupe_key, stream_key
from shared.envelope import ENVELOPE_SQL
from shared.lifecycle import Loop, backoff_delay

logger = logging.getLogger(__name__)

# KEYS[1] the stream; KEYS[2..] one dedupe key per event. ARGV[1] dedupe TTL, ARGV[2] "1"
# when republishing events Redis lost, ARGV[3] the entry's field name, ARGV[4..] the
# envelopes in KEYS order. Returns the stream ids, existing or new, in the same order.
#
# A first publish takes the id its dedupe key names as the event's entry: an earlier XADD
# whose mark in Postgres was lost. A republish takes it only while that entry is still in
# the stream: the key names either the lost entry (gone: add it again) or an earlier
# republish whose new id never reached Postgres (the relay died, or its commit or Redis's
# reply was lost), which must not be added a second time.
PUBLISH_SCRIPT = """
local ids = {}
for i = 2, #KEYS do
  local id = redis.call('GET', KEYS[i])
  if id and ARGV[2] == '1' and #redis.call('XRANGE', KEYS[1], id, id) == 0 then id = false end
  if not id then
    id = redis.call('XADD', KEYS[1], '*', ARGV[3], ARGV[i + 2])
    redis.call('SET', KEYS[i], id, 'EX', ARGV[1])
  end
  ids[#ids + 1] = id
end
return ids
"""

# What a publish needs of an outbox row (see Row), the envelope built by Postgres.
ROW_COLUMNS = f"""id, queue, event_id::text AS event_id,
    headers->>'request_id' AS request_id, {ENVELOPE_SQL} AS envelope"""

_CLAIM = f"""
SELECT {ROW_COLUMNS}
FROM outbox
WHERE published_at IS NULL AND available_at <= now() AND dead_lettered_at IS NULL
ORDER BY available_at, id
LIMIT $1
FOR UPDATE SKIP LOCKED
"""  # noqa: S608 - built from constants, no input
# (dead_lettered_at on an unpublished row: only migration 002's, for a payload that was
# not a JSON object, kept for an operator.)

_MARK_PUBLISHED = """
UPDATE outbox AS o
SET published_at = now(), stream_id = u.sid, publish_attempts = o.publish_attempts + 1,
    last_error = NULL
FROM unnest($1::bigint[], $2::text[]) AS u(id, sid)
WHERE o.id = u.id
"""

_MARK_FAILED = """
UPDATE outbox AS o
SET publish_attempts = o.publish_attempts + 1, last_error = u.err,
    available_at = now() + make_interval(secs => u.delay)
FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS u(id, err, delay)
WHERE o.id = u.id
"""

# Lua scripts block Redis while they run: publish in chunks of this many, pipelined.
_CHUNK = 250

# After a refusal a batch is published one row at a time, inside its claim's transaction,
# with no statement to Postgres between rows that go through: Postgres ends a session idle
# in a transaction for IDLE_IN_TRANSACTION_SECONDS (60 s, shared.connections). With Redis
# slow, tens of ms a call, a batch of 1,000 would pass that, roll back and be claimed
# again, over and over. The pass starts no row once this long has gone by since the claim;
# the rows it did not reach stay due for the next batch, which the loop claims at once.
# Counted from the claim, the transaction then idles this long, plus the call under way
# (at most REDIS_SOCKET_TIMEOUT_SECONDS, 10 s, a reply; three replies if the script must
# be loaded again): well under the 60 s.
ONE_BY_ONE_BUDGET_SECONDS = 10.0


class Row(NamedTuple):
    """An outbox row ready to publish (a tuple: the relay makes thousands a second)."""

    id: int
    queue: str
    event_id: str
    data: bytes
    request_id: str | None = None


class Publisher:
    """Publishes envelopes to streams with Redis-side dedupe by event id."""

    def __init__(self, redis: aioredis.Redis, dedupe_ttl: int) -> None:
        self.redis = redis
        self.dedupe_ttl = dedupe_ttl
        # EVALSHA, loading the script only when Redis says NOSCRIPT (after a restart).
        # redis-py's registered scripts would send SCRIPT EXISTS before every pipeline: a
        # round trip per batch, and at a few hundred signups a second a batch is one row.
        self._sha = hashlib.sha1(PUBLISH_SCRIPT.encode(), usedforsecurity=False).hexdigest()

    async def publish(self, rows: list[Row], *, republish: bool = False) -> list[str]:
        """XADD every row (or find its earlier XADD); stream ids in row order.

        `republish`: the rows' entries were found missing from their streams (see
        PUBLISH_SCRIPT for what that changes).

        Raises ResponseError if Redis refuses a chunk; connection errors propagate.
        """
        by_queue: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            by_queue[row.queue].append(i)
        chunks = [
            (queue, idxs[start : start + _CHUNK])
            for queue, idxs in by_queue.items()
            for start in range(0, len(idxs), _CHUNK)
        ]
        results = await self._run(rows, chunks, republish)
        unknown = [k for k, r in enumerate(results) if isinstance(r, NoScriptError)]
        if unknown:
            # Redis lost its scripts (a restart). A chunk refused with NOSCRIPT did nothing,
            # but the pipeline is not atomic: another relay may have loaded the script in
            # between and later chunks ran. Load it and send again only the refused ones.
            await self.redis.script_load(PUBLISH_SCRIPT)
            again = await self._run(rows, [chunks[k] for k in unknown], republish)
            for k, result in zip(unknown, again, strict=True):
                results[k] = result
        for result in results:
            if isinstance(result, ResponseError):
                raise result
        ids: list[str] = [""] * len(rows)
        for (_, chunk), result in zip(chunks, results, strict=True):
            for i, sid in zip(chunk, result, strict=True):
                ids[i] = sid.decode() if isinstance(sid, bytes) else str(sid)
        return ids

    async def _run(
        self, rows: list[Row], chunks: list[tuple[str, list[int]]], republish: bool
    ) -> list[Any]:
        """One pipelined EVALSHA per chunk; each result, or the error Redis gave it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for queue, chunk in chunks:
                keys = [stream_key(queue)] + [dedupe_key(rows[i].event_id, queue) for i in chunk]
                args: list[Any] = [self.dedupe_ttl, "1" if republish else "0", ENVELOPE_FIELD]
                args += [rows[i].data for i in chunk]
                pipe.evalsha(self._sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))


def to_row(rec: asyncpg.Record) -> Row:
    """A Row from a record selected with ROW_COLUMNS."""
    return Row(
        rec["id"], rec["queue"], rec["event_id"], rec["envelope"].encode(), rec["request_id"]
    )


class Wakeups:
    """Which of a process's relay loops a NOTIFY wakes.

    One commit, one claim: waking every loop on every NOTIFY made all but one of them run
    an empty claim transaction per signup, which at a few hundred signups a second was
    most of the relay's and a good part of Postgres's CPU. An idle loop is woken. When all
    are busy, the NOTIFY is remembered, and the first loop to finish its batch claims once
    more before it sleeps (a row committed after its claim began is not in that batch). A
    loop that claimed a full batch calls help(), so the others join in on a backlog.
    """

    def __init__(self, loops: list[RelayLoop]) -> None:
        self.loops = loops
        self._missed = False
        for loop in loops:
            loop.wakeups = self

    def notify(self) -> None:
        if not self.help():
            self._missed = True

    def help(self) -> bool:
        """Wake one idle loop; False if none is idle."""
        for loop in self.loops:
            if loop.idle:
                loop.wake()
                return True
        return False

    def take_missed(self) -> bool:
        """True once for a NOTIFY that came while every loop was busy."""
        missed, self._missed = self._missed, False
        return missed


class RelayLoop(Loop):
    """Drains due outbox rows batch by batch; woken by NOTIFY, polls as a fallback."""

    name = "relay"

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        redis: aioredis.Redis,
        settings: RelaySettings,
        name: str = "relay",
    ) -> None:
        super().__init__()
        self.name = name
        self.pool = pool
        self.settings = settings
        self.publisher = Publisher(redis, settings.dedupe_ttl_seconds)
        self.idle_interval = settings.poll_interval_seconds
        self.wakeups: Wakeups | None = None  # set by Wakeups(loops), which shares NOTIFYs

    async def run_once(self) -> bool:
        """Publish one batch; True if more may be waiting (a full batch, or a NOTIFY that
        came while every loop was busy)."""
        full = await self._run_batch()
        if self.wakeups is None:
            return full
        if full:
            self.wakeups.help()
        # Checked after the commit, with no await before the loop sleeps: a NOTIFY from
        # now on finds this loop idle.
        return self.wakeups.take_missed() or full

    async def _run_batch(self) -> bool:
        # A ResponseError that refuses every write (see refuses_every_write) propagates:
        # the batch rolls back untouched and the loop backs off, as when Redis is down.
        started = time.perf_counter()
        async with self.pool.acquire() as conn, conn.transaction():
            records = await conn.fetch(_CLAIM, self.settings.batch_size)
            if not records:
                return False
            deadline = time.monotonic() + ONE_BY_ONE_BUDGET_SECONDS
            rows = [to_row(r) for r in records]
            try:
                ids = await self.publisher.publish(rows)
                await conn.execute(_MARK_PUBLISHED, [r.id for r in rows], ids)
                published = reached = len(rows)
            except ResponseError as e:
                metrics.ERRORS.labels("redis_refused").inc()
                if refuses_every_write(e):
                    raise
                # Redis refused something: find out which rows, publish the rest.
                published, reached = await self._publish_one_by_one(conn, rows, deadline)
                if reached < len(rows):
                    logger.warning(
                        "relay_one_by_one_cut",
                        extra={"rows": len(rows), "reached": reached, "published": published},
                    )
        metrics.PUBLISHED.inc(published)
        metrics.BATCH_SIZE.observe(len(rows))
        metrics.BATCH_DURATION.observe(time.perf_counter() - started)
        # Rows a row-by-row pass did not reach are due: claimed again at once, as after a
        # full batch.
        return len(rows) >= self.settings.batch_size or reached < len(rows)

    async def _publish_one_by_one(
        self, conn: DbConn, rows: list[Row], deadline: float
    ) -> tuple[int, int]:
        """A row Redis will not take must not hold up the others (it is retried later).
        (rows published, rows started before `deadline`, a time.monotonic())."""
        ok_ids, ok_sids = [], []
        bad_ids, bad_errs, bad_delays = [], [], []
        reached = 0
        for row in rows:
            if time.monotonic() >= deadline:
                break
            reached += 1
            try:
                (sid,) = await self.publisher.publish([row])
            except ResponseError as e:
                if refuses_every_write(e):
                    raise
                attempts = await conn.fetchval(
                    "SELECT publish_attempts FROM outbox WHERE id = $1", row.id
                )
                bad_ids.append(row.id)
                bad_errs.append(str(e)[:500])
                bad_delays.append(backoff_delay(attempts + 1, 1.0, 300.0))
                logger.error(
                    "relay_publish_refused",
                    extra={
                        "event_id": row.event_id,
                        "request_id": row.request_id,
                        "error": str(e)[:200],
                    },
                )
            else:
                ok_ids.append(row.id)
                ok_sids.append(sid)
        if ok_ids:
            await conn.execute(_MARK_PUBLISHED, ok_ids, ok_sids)
        if bad_ids:
            await conn.execute(_MARK_FAILED, bad_ids, bad_errs, bad_delays)
        return len(ok_ids), reached


# Refusals that are about Redis, not about a row: a replica after a failover (READONLY),
# memory full under noeviction (OOM), a failing snapshot (MISCONF), a script running too
# long (BUSY), a cluster or replication state. Inside a script Redis 6 reports them as a
# generic script error carrying "-OOM ...", hence the search in the text too. Not NOPERM:
# an ACL may refuse one queue's keys only, and the rows of the other queues must go on.
_WHOLE_SERVER = re.compile(
    r"(?:^|[\s-])(?:READONLY|OOM|MISCONF|BUSY|MASTERDOWN|CLUSTERDOWN|NOREPLICAS)\b"
)


def refuses_every_write(e: ResponseError) -> bool:
    if isinstance(e, ReadOnlyError | OutOfMemoryError):
        return True
    return _WHOLE_SERVER.search(str(e)) is not None
