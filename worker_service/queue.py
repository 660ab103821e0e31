"""The Redis side of one queue: its stream, consumer group and dead-letter stream.

Failed entries wait out their retry backoff parked under a reserved consumer name
(RETRY_PARKING_CONSUMER): moving them there with XCLAIM ... JUSTID resets their idle time
without counting a delivery, so "idle for longer than the backoff of its delivery count"
is exactly when a parked entry is due again. Entries held by live workers never look idle
for long, because workers renew their claims; those of a crashed worker do, and are taken
over after the visibility timeout.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared.constants import (
    CONSUMER_GROUP,
    DEDUPE_TTL_DEFAULT_SECONDS,
    ENVELOPE_FIELD,
    RETRY_PARKING_CONSUMER,
    alone_key,
    dead_letter_key,
    dedupe_key,
    stream_key,
)

Fields = dict[bytes, bytes]

# KEYS: dead-letter stream, stream, [dedupe key]. ARGV: dead id, field name, envelope,
# TTL of a dedupe key made anew. The key names the new entry whether or not it had expired:
# a replay whose last step (the row pointed at the new entry) never ran leaves the row
# naming the old, acknowledged entry, and once that one is trimmed the reconciler's
# republish finds the new one through the key instead of adding a second.
_REPLAY_SCRIPT = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return false end
local id = redis.call('XADD', KEYS[2], '*', ARGV[2], ARGV[3])
if KEYS[3] and not redis.call('SET', KEYS[3], id, 'XX', 'KEEPTTL') then
  redis.call('SET', KEYS[3], id, 'EX', ARGV[4])
end
return id
"""
# A dedupe key a replay makes anew lives as long as the relay's by default
# (RELAY_DEDUPE_TTL_SECONDS): the reconciler looks at the event within far less.
REPLAY_DEDUPE_TTL_SECONDS = DEDUPE_TTL_DEFAULT_SECONDS

HAND_OVER_CHUNK = 500  # ids per hand-over script: a few ms of Redis each
# Pending entries read per consumer for the oldest-delivery gauge, each scrape: a consumer
# holds at most its concurrency plus one read, unless it stopped with more.
STATS_PENDING_SCAN = 1000
# How long the mark of an orphan running alone lasts: until its next takeover (within the
# visibility timeout, or at a restart); expired, the orphan gets one more run alone.
ALONE_MARK_TTL_SECONDS = 86_400

# Hands entries over to a consumer (the parking one; or the same one, to renew its claims
# with idle 0 or to leave them idle), only those `owner` still holds, checked in the same
# script so that no takeover slips in between: one another worker took over meanwhile
# (this one stalled past the visibility timeout) stays where it is, or both would run it.
# ARGV: group, owner, new owner, idle ms, then (entry id, delivery count or -1) pairs.
_HAND_OVER_SCRIPT = """
local moved = 0
for i = 5, #ARGV, 2 do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    if ARGV[i + 1] == '-1' then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[i], 'IDLE', ARGV[4], 'JUSTID')
    else
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[i], 'IDLE', ARGV[4],
                 'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
    end
    moved = moved + 1
  end
end
return moved
"""


# The opening of a script about one entry (KEYS[1] the stream; ARGV[1] the group, ARGV[2]
# the consumer, ARGV[3] the entry id): it goes no further, answering nil, unless that
# consumer still holds the entry.
_IF_STILL_HELD = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then return false end
"""


# KEYS: stream, alone mark. ARGV: group, consumer, entry id, deliveries, TTL. The claim's
# renewal and the mark, only if the consumer still holds the entry.
_MARK_ALONE_SCRIPT = (
    _IF_STILL_HELD
    + """
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
return 1
"""
)


# KEYS: stream, dead-letter stream. ARGV: group, consumer, entry id, then the dead
# letter's field and value pairs. The dead letter and the entry's XACK, only if the
# consumer still holds the entry: one it held when it stalled past the visibility timeout
# has been taken over, and its new holder records the outcome (a second dead letter for
# one event would be replayed twice).
_DEAD_LETTER_SCRIPT = (
    _IF_STILL_HELD
    + """
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return id
"""
)


# KEYS: stream. ARGV: group, consumer, then (entry id, owner, delivery count, min idle ms)
# quads, as the caller's scan saw them. Claims each entry only if it is still with that
# owner, at that count, and idle for that long, checked in the same script: a plain XCLAIM
# checks the idle time only, so a parked retry another worker took a moment before (and
# runs), or ran and parked again, with its idle time already past a short backoff, would
# be taken again: run twice at once, or its next attempt before its backoff. Returns, per
# entry claimed, {id, its delivery count after this claim, the entry {id, fields} or false
# if deleted}.
_CLAIM_SCRIPT = """
local taken = {}
for i = 3, #ARGV, 4 do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[i + 1] and p[1][4] == tonumber(ARGV[i + 2])
      and p[1][3] >= tonumber(ARGV[i + 3]) then
    local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i])
    -- A deleted entry: Redis 6 answers nil (false here) and keeps it pending; Redis 7
    -- leaves it out and drops it from the pending list itself.
    if got[1] ~= nil then
      taken[#taken + 1] = {ARGV[i], p[1][4] + 1, got[1]}
    end
  end
end
return taken
"""


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    fields: Fields | None  # None: the entry was deleted from the stream (trimmed)
    deliveries: int
    # An orphan whose last delivery ran alone and ended with no outcome: it took its
    # worker down (or stalled it) by itself.
    killed_alone: bool = False


@dataclass(frozen=True, slots=True)
class PendingInfo:
    id: str
    consumer: str
    idle_ms: int
    deliveries: int


def retry_delay(entry_id: str, deliveries: int, base: float, cap: float) -> float:
    """Backoff before delivery number `deliveries + 1`, with jitter that is stable per entry.

    The jitter is seeded by (entry, delivery), so every scan of the parked entries computes
    the same due time and several workers agree on it.
    """
    exp = min(cap, base * (2 ** min(deliveries - 1, 32)))
    seed = hashlib.blake2b(f"{entry_id}:{deliveries}".encode(), digest_size=8).digest()
    return random.Random(seed).uniform(exp / 2, exp)


def entry_time(entry_id: str) -> float:
    """The Unix time (seconds) in a stream id."""
    return int(entry_id.split("-", 1)[0]) / 1000


def _sid(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


class StreamQueue:
    def __init__(self, redis: aioredis.Redis, queue: str, group: str = CONSUMER_GROUP) -> None:
        # redis-py types replies as unions of every protocol's shapes; this module parses
        # the RESP2 replies itself, so the client is used untyped here.
        self.redis: Any = redis
        self.queue = queue
        self.group = group
        self.stream = stream_key(queue)
        self.dead = dead_letter_key(queue)

    async def ensure_group(self) -> bool:
        """Create the group (and the stream) if missing; True if it was created.

        The group starts at 0, not $: entries added before it existed (after a Redis
        restart, by the relay's republishing) are work too.
        """
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" in str(e):
                return False
            raise
        return True

    async def read(self, consumer: str, count: int, block_ms: int | None) -> list[Entry]:
        """New entries for this consumer (XREADGROUP >)."""
        reply = await self.redis.xreadgroup(
            self.group, consumer, {self.stream: ">"}, count=count, block=block_ms
        )
        if not reply:
            return []
        return [Entry(_sid(i), f, 1) for i, f in reply[0][1]]

    async def read_own_pending(self, consumer: str, count: int, after: str = "0") -> list[Entry]:
        """This consumer's pending entries with ids above `after` (XREADGROUP from an id:
        each counts a delivery), with their delivery counts."""
        reply = await self.redis.xreadgroup(self.group, consumer, {self.stream: after}, count=count)
        if not reply or not reply[0][1]:
            return []
        entries = reply[0][1]
        infos = await self.redis.xpending_range(
            self.stream,
            self.group,
            min=_sid(entries[0][0]),
            max=_sid(entries[-1][0]),
            count=len(entries),
            consumername=consumer,
        )
        counts = {_sid(p["message_id"]): int(p["times_delivered"]) for p in infos}
        return [Entry(_sid(i), f or None, counts.get(_sid(i), 1)) for i, f in entries]

    async def pending(
        self, *, min_idle_ms: int, count: int, consumer: str | None = None, start: str = "-"
    ) -> list[PendingInfo]:
        kwargs: dict[str, Any] = {"idle": min_idle_ms}
        if consumer is not None:
            kwargs["consumername"] = consumer
        rows = await self.redis.xpending_range(
            self.stream, self.group, min=start, max="+", count=count, **kwargs
        )
        return [
            PendingInfo(
                _sid(r["message_id"]),
                _sid(r["consumer"]),
                int(r["time_since_delivered"]),
                int(r["times_delivered"]),
            )
            for r in rows
        ]

    async def claim(self, consumer: str, claims: list[tuple[PendingInfo, int]]) -> list[Entry]:
        """Claim each (pending entry as a scan saw it, min idle ms) that is still as it was
        seen (its owner, its delivery count) and still that idle; those come back, each
        with its delivery count as this claim makes it. When two workers race for an entry,
        only one gets it."""
        if not claims:
            return []
        args: list[str | int] = [self.group, consumer]
        for seen, min_idle in claims:
            args += [seen.id, seen.consumer, seen.deliveries, min_idle]
        taken: list[Entry] = []
        for entry_id, deliveries, item in await self.redis.eval(
            _CLAIM_SCRIPT, 1, self.stream, *args
        ):
            fields = dict(zip(item[1][::2], item[1][1::2], strict=True)) if item else None
            taken.append(Entry(_sid(entry_id), fields or None, int(deliveries)))
        return taken

    async def renew(self, consumer: str, ids: list[str]) -> int:
        """Reset the idle time of those of `ids` this consumer still holds (no delivery is
        counted); how many. An entry another worker took over (this one stalled past the
        visibility timeout) or that was parked for a retry is left where it is: a plain
        XCLAIM would take it back, and two workers would run it."""
        return await self._hand_over(consumer, consumer, ids, False, None)

    async def park_for_retry(
        self,
        owner: str,
        ids: list[str],
        *,
        due_now: bool = False,
        deliveries: dict[str, int] | None = None,
    ) -> int:
        """Hand entries `owner` holds to the parking consumer to wait out their backoff;
        how many it still held.

        due_now: make them look idle for a long time, so they are taken again at once (a
        worker that stops hands back what it had not finished). deliveries: set these
        entries' delivery counts (a shutdown takes back the delivery it cut short).
        """
        return await self._hand_over(owner, RETRY_PARKING_CONSUMER, ids, due_now, deliveries)

    async def hand_back_orphans(
        self, consumer: str, ids: list[str], deliveries: dict[str, int]
    ) -> int:
        """Orphans a stopping worker had taken but not finished: left with it, as idle as a
        dead worker's entries, so that the next worker takes them over at once, as orphans
        (run alone), with the deliveries given; how many it still held."""
        return await self._hand_over(consumer, consumer, ids, True, deliveries)

    async def _hand_over(
        self,
        owner: str,
        to: str,
        ids: list[str],
        due_now: bool,
        deliveries: dict[str, int] | None,
    ) -> int:
        idle = 10**12 if due_now else 0
        moved = 0
        for i in range(0, len(ids), HAND_OVER_CHUNK):  # a script blocks Redis while it runs
            args: list[str | int] = [self.group, owner, to, idle]
            for entry_id in ids[i : i + HAND_OVER_CHUNK]:
                count = -1 if deliveries is None else max(0, deliveries.get(entry_id, 0))
                args += [entry_id, count]
            moved += int(await self.redis.eval(_HAND_OVER_SCRIPT, 1, self.stream, *args))
        return moved

    async def mark_alone(self, consumer: str, entry_id: str, deliveries: int) -> bool:
        """Record that this delivery of an orphan runs alone (see Entry.killed_alone), and
        renew the claim, if `consumer` still holds the entry; False if it lost it (its
        claim lapsed in an outage longer than the visibility timeout and another worker
        took the entry over: that one runs it)."""
        marked = await self.redis.eval(
            _MARK_ALONE_SCRIPT,
            2,
            self.stream,
            alone_key(entry_id, self.queue),
            self.group,
            consumer,
            entry_id,
            str(deliveries),
            ALONE_MARK_TTL_SECONDS,
        )
        return bool(marked)

    async def clear_alone_marks(self, ids: list[str]) -> None:
        """These entries' runs ended without taking their worker down (an outcome, or a
        stop's hand-back): a mark left would blame a later delivery."""
        if ids:
            await self.redis.delete(*(alone_key(entry_id, self.queue) for entry_id in ids))

    async def take_alone_mark(self, entry_id: str, deliveries: int) -> bool:
        """At a takeover that made `deliveries`: whether the delivery just before it ran
        alone. A mark of an earlier delivery (one that ended in a retry, or that a stop
        handed back uncounted) does not count. The mark is cleared either way."""
        mark = await self.redis.getdel(alone_key(entry_id, self.queue))
        return mark is not None and int(mark) == deliveries - 1

    async def ack(self, ids: list[str]) -> None:
        if ids:
            await self.redis.xack(self.stream, self.group, *ids)

    async def dead_letter(
        self,
        entry: Entry,
        *,
        consumer: str,
        reason: str,
        error: str,
        event_id: str | None,
        task_type: str | None,
    ) -> str | None:
        """XADD to the dead-letter stream and XACK the entry, in one script, if `consumer`
        still holds it; the dead letter's id, or None if another consumer holds it now."""
        fields = entry.fields or {}
        doc: dict[str, Any] = {
            "original_id": entry.id,
            "reason": reason,
            "error": error[:2000],
            "attempts": entry.deliveries,
            "event_id": event_id or "",
            "task_type": task_type or "",
            "enqueued_at": datetime.fromtimestamp(entry_time(entry.id), UTC).isoformat(),
            "failed_at": datetime.now(UTC).isoformat(),
            # Every original field, so nothing is lost even when the entry was garbage.
            "fields": orjson.dumps({_text(k): _text(v) for k, v in fields.items()}),
        }
        raw = fields.get(ENVELOPE_FIELD.encode())
        if raw is not None:
            doc[ENVELOPE_FIELD] = raw
        pairs = [item for field_value in doc.items() for item in field_value]
        dead_id = await self.redis.eval(
            _DEAD_LETTER_SCRIPT,
            2,
            self.stream,
            self.dead,
            self.group,
            consumer,
            entry.id,
            *pairs,
        )
        return _sid(dead_id) if dead_id else None

    async def replay_dead(self, dead_id: str, envelope: bytes, event_id: str | None) -> str | None:
        """Move a dead letter's envelope back to the stream; None if it was gone already.

        One script: the entry is re-added only if this call deleted the dead letter, so
        two operators replaying the same one at once queue it once.
        """
        keys = [self.dead, self.stream]
        if event_id:
            keys.append(dedupe_key(event_id, self.queue))
        new_id = await self.redis.eval(
            _REPLAY_SCRIPT,
            len(keys),
            *keys,
            dead_id,
            ENVELOPE_FIELD,
            envelope,
            REPLAY_DEDUPE_TTL_SECONDS,
        )
        return _sid(new_id) if new_id else None

    async def trim_acknowledged(self) -> int:
        """Delete entries every group has acknowledged (XTRIM MINID); 0 if no group.

        Everything older than both the oldest pending entry and the last entry delivered
        to a group has been acknowledged by that group, so nothing unfinished is dropped.
        """
        try:
            groups = await self.redis.xinfo_groups(self.stream)
        except ResponseError:
            return 0  # no stream
        if not groups:
            return 0
        bounds: list[tuple[int, int]] = []
        for g in groups:
            bounds.append(_id_tuple(_sid(g["last-delivered-id"])))
            if int(g["pending"]):
                summary = await self.redis.xpending(self.stream, _sid(g["name"]))
                # None if the group acknowledged its last pending entry since XINFO: its
                # last-delivered-id, read before, is then the bound.
                if summary["min"] is not None:
                    bounds.append(_id_tuple(_sid(summary["min"])))
        ms, seq = min(bounds)
        if (ms, seq) == (0, 0):
            return 0
        trimmed: int = await self.redis.xtrim(self.stream, minid=f"{ms}-{seq}", approximate=False)
        return trimmed

    async def stats(self) -> dict[str, float]:
        """Stream length, pending, oldest pending age, lag, dead letters, consumers."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.stream)
            pipe.xpending(self.stream, self.group)
            pipe.xinfo_groups(self.stream)
            pipe.xlen(self.dead)
            replies = await pipe.execute(raise_on_error=False)
        length, summary, groups, dead = replies
        out: dict[str, float] = {
            "stream_length": length if isinstance(length, int) else 0,
            "dead_letters": dead if isinstance(dead, int) else 0,
            "pending": 0,
            "oldest_pending_age": 0.0,
            "lag": -1,
            "consumers": 0,
        }
        if isinstance(summary, dict) and summary.get("pending"):
            out["pending"] = int(summary["pending"])
            out["oldest_pending_age"] = await self._oldest_delivery_age(summary["consumers"])
        if isinstance(groups, list):
            for g in groups:
                if _sid(g["name"]) == self.group:
                    out["consumers"] = int(g["consumers"])
                    lag = g.get("lag")
                    out["lag"] = int(lag) if lag is not None else -1
        return out

    async def _oldest_delivery_age(self, consumers: list[dict[str, Any]]) -> float:
        """Seconds since the longest-waiting pending entry was delivered or renewed, over
        the first STATS_PENDING_SCAN entries of each consumer; entries parked to wait out
        a retry's backoff do not count (they wait as they should, up to an hour with the
        defaults). Not the entry's age: a backlog's old entries delivered just now are not
        stuck. Capped at the entry's age (a stop's hand-back makes an entry look idle for
        ever, to be taken at once)."""
        names = [c["name"] for c in consumers if _sid(c["name"]) != RETRY_PARKING_CONSUMER]
        if not names:
            return 0.0
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.xpending_range(
                    self.stream, self.group, "-", "+", STATS_PENDING_SCAN, consumername=name
                )
            replies = await pipe.execute(raise_on_error=False)
        now = time.time()
        ages: list[float] = [
            min(int(p["time_since_delivered"]) / 1000, now - entry_time(_sid(p["message_id"])))
            for reply in replies
            if isinstance(reply, list)
            for p in reply
        ]
        return max([0.0, *ages])


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
