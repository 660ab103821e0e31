"""outboxctl against the real servers: dead letters made by the real worker path.

The CLI runs in-process through main([...]) (in a thread: it runs its own event loop) and,
to prove the entry point, as `python -m shared.ctl` subprocesses.
"""

from __future__ import annotations

import asyncio
import io
import os
import pty
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from devstack.postgres import PostgresServer
from devstack.procs import free_port
from devstack.redis import RedisServer
from relay.publisher import ROW_COLUMNS, Publisher, RelayLoop, to_row
from relay.reconciler import Reconciler
from shared import ctl as ctl_mod
from shared.constants import dead_letter_key, dedupe_key, stream_key
from shared.ctl import DeadLetter, main, replay_one, scan_dead
from shared.errors import PermanentError
from shared.outbox import enqueue
from tests.helpers import relay_settings, worker_settings
from worker_service.consumer import Worker
from worker_service.queue import StreamQueue
from worker_service.router import Router, TaskContext

STREAM = stream_key()
DEAD = dead_letter_key()
ROOT = Path(__file__).resolve().parent.parent


class Handlers:
    """Task types "t" and "u": fail permanently while `fail` is set, else record the call."""

    def __init__(self) -> None:
        self.fail = True
        self.done: list[tuple[str, int]] = []
        self.router = Router()

        @self.router.handler("t")
        async def t(ctx: TaskContext) -> None:
            await self.run(ctx)

        @self.router.handler("u")
        async def u(ctx: TaskContext) -> None:
            await self.run(ctx)

    async def run(self, ctx: TaskContext) -> None:
        if self.fail:
            raise PermanentError(f"cannot do {ctx.envelope.type} {ctx.payload['i']}")
        self.done.append((ctx.envelope.type, int(ctx.payload["i"])))


class Pipeline:
    """Publishes through the real relay and runs a real worker, step by step."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        redis: aioredis.Redis,
        pg: PostgresServer,
        rs: RedisServer,
    ) -> None:
        self.pool = pool
        self.redis: Any = redis
        self.handlers = Handlers()
        self.relay = RelayLoop(pool, redis, relay_settings(pg, rs))
        settings = worker_settings(pg, rs, max_attempts=1)
        self.worker = Worker(self.handlers.router, pool, redis, settings)

    async def publish(self, n: int, task: str = "t", start: int = 0) -> list[str]:
        async with self.pool.acquire() as conn, conn.transaction():
            ids = [str(await enqueue(conn, task, {"i": start + i})) for i in range(n)]
        while await self.relay.run_once():
            pass
        return ids

    async def work(self) -> int:
        await self.worker.setup()
        return await self.worker.run_once()

    async def make_dead_letters(self) -> dict[str, str]:
        """3 permanent errors (t 0, t 1, u 0) and 2 undecodable entries (one with a
        garbage envelope field, one with no envelope field); {label: dead id}."""
        t_ids = await self.publish(2, "t")
        u_ids = await self.publish(1, "u")
        await self.redis.xadd(STREAM, {"e": b"\xff\xfenot json"})
        await self.redis.xadd(STREAM, {"other": "field"})
        assert await self.work() == 5
        by_label: dict[str, str] = {}
        labels = {t_ids[0]: "t0", t_ids[1]: "t1", u_ids[0]: "u0"}
        for sid, fields in await self.redis.xrange(DEAD):
            if b"original_id" not in fields:
                continue  # put there by the test itself
            event_id = fields[b"event_id"].decode()
            if event_id:
                by_label[labels[event_id]] = sid.decode()
            elif b"e" in fields:
                by_label["garbage"] = sid.decode()
            else:
                by_label["no_envelope"] = sid.decode()
        by_label.update({f"event_{k}": v for v, k in labels.items()})
        assert len(by_label) == 8
        return by_label

    async def dead_letter(self, dead_id: str) -> DeadLetter:
        ((_, raw),) = await self.redis.xrange(DEAD, dead_id, dead_id)
        return DeadLetter(dead_id, raw)

    async def dead_ids(self) -> list[str]:
        return [sid.decode() for sid, _ in await self.redis.xrange(DEAD)]

    async def row(self, event_id: str) -> asyncpg.Record:
        rec: asyncpg.Record | None = await self.pool.fetchrow(
            "SELECT * FROM outbox WHERE event_id = $1", event_id
        )
        assert rec is not None
        return rec


@pytest.fixture
async def pipe(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    pg_server: PostgresServer,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Pipeline:
    monkeypatch.setenv("DATABASE_URL", pg_server.dsn)
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.delenv("QUEUE", raising=False)
    return Pipeline(pool, redis, pg_server, redis_server)


async def ctl(*argv: str) -> int:
    """main() in a thread: it runs its own event loop with asyncio.run."""
    return await asyncio.to_thread(main, list(argv))


def run_module(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.ctl", *argv],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def table_value(text: str, label: str) -> str:
    for line in text.splitlines():
        if line.strip().startswith(label):
            return line.strip()[len(label) :].strip()
    raise AssertionError(f"no {label!r} line in:\n{text}")


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


# -- status --------------------------------------------------------------------------------


async def test_status_json_and_text_match_reality(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    await pipe.make_dead_letters()  # 3 dead rows in Postgres, 5 dead letters in Redis
    await pipe.publish(2, "t", start=10)  # in flight: published, not completed
    await StreamQueue(pipe.redis, "default").read("stuck", 1, None)  # 1 pending on "stuck"
    async with pipe.pool.acquire() as conn, conn.transaction():
        await enqueue(conn, "t", {"i": 99})  # unpublished backlog
        # Not this queue's: counted nowhere here.
        for state in ("unpublished", "in flight", "dead-lettered"):
            event = await enqueue(conn, "t", {"state": state}, queue="other")
            if state != "unpublished":
                await conn.execute(
                    "UPDATE outbox SET published_at = now() WHERE event_id = $1", event
                )
            if state == "dead-lettered":
                await conn.execute(
                    "UPDATE outbox SET dead_lettered_at = now() WHERE event_id = $1", event
                )
        # Given up on before it was published (migration 002's kind): dead-lettered, and
        # not in the backlog.
        given_up = await enqueue(conn, "t", {"i": 98})
        await conn.execute(
            "UPDATE outbox SET dead_lettered_at = now() WHERE event_id = $1", given_up
        )
    capsys.readouterr()

    assert await ctl("status", "--json") == 0
    st = orjson.loads(capsys.readouterr().out)
    assert st["queue"] == "default"
    o, r = st["outbox"], st["redis"]
    assert o["backlog"] == 1
    assert 0 <= o["oldest_unpublished_age_seconds"] < 60
    assert (o["refused"], o["oldest_refused_error"]) == (0, None)
    assert o["in_flight"] == 2
    assert o["dead_lettered"] == 4
    assert r["stream_length"] == await pipe.redis.xlen(STREAM) == 7
    assert r["pending"] == 1
    assert r["dead_letters"] == 5
    assert r["group_exists"] is True
    assert r["lag"] is None or isinstance(r["lag"], int)  # Redis 7+ reports it
    consumers = {c["name"]: c["pending"] for c in r["consumers"]}
    assert consumers == {"w1": 0, "stuck": 1}

    assert await ctl("status") == 0
    text = capsys.readouterr().out
    assert table_value(text, "unpublished backlog") == "1"
    assert table_value(text, "in flight (published, not completed)") == "2"
    assert table_value(text, "dead-lettered") == "4"
    assert table_value(text, "length") == "7"
    assert table_value(text, "pending") == "1"
    assert table_value(text, "Redis dead letters").endswith(" 5")
    assert table_value(text, "stuck").split()[0] == "1"

    # The relay's mark of a row Redis refused, made two hours after its signup: the age
    # counts from its creation, as the relay's gauge does, and the refusal is shown.
    await pipe.pool.execute(
        "UPDATE outbox SET created_at = now() - interval '2 hours',"
        " available_at = now() + interval '5 minutes', publish_attempts = 30,"
        " last_error = 'WRONGTYPE Operation against a key holding the wrong kind of value'"
        " WHERE published_at IS NULL"
    )
    assert await ctl("status", "--json") == 0
    o = orjson.loads(capsys.readouterr().out)["outbox"]
    assert o["oldest_unpublished_age_seconds"] > 7000
    assert o["refused"] == 1
    assert o["oldest_refused_error"].startswith("WRONGTYPE")
    assert await ctl("status") == 0
    text = capsys.readouterr().out
    assert table_value(text, "oldest unpublished age").startswith("2h ")
    assert table_value(text, "refused by Redis, not yet published").startswith("1 (oldest: WRONG")


def test_status_counts_at_their_cap_are_shown_as_at_least() -> None:
    assert ctl_mod._capped(10_000, 10_000) == "10000+"
    assert ctl_mod._capped(9_999, 10_000) == "9999"


async def test_status_on_an_empty_redis_says_the_group_is_missing(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await ctl("status", "--json") == 0
    st = orjson.loads(capsys.readouterr().out)
    assert st["redis"]["group_exists"] is False
    assert st["redis"]["stream_length"] == 0
    assert st["redis"]["consumers"] == []
    assert st["outbox"]["oldest_unpublished_age_seconds"] is None
    assert await ctl("status") == 0
    text = capsys.readouterr().out
    assert table_value(text, "held longest without renewal") == "-"  # nothing pending
    assert table_value(text, "oldest unpublished age") == "-"


# -- list / show ---------------------------------------------------------------------------


async def test_list_with_filters_limit_and_order(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await pipe.make_dead_letters()
    capsys.readouterr()

    assert await ctl("dead", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["ID", "FAILED_AT", "TASK"]
    assert [line.split()[0] for line in lines[1:]] == await pipe.dead_ids()  # oldest first

    assert await ctl("dead", "list", "--reason", "undecodable") == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert sorted(r.split()[0] for r in rows) == sorted([ids["garbage"], ids["no_envelope"]])

    assert await ctl("dead", "list", "--task", "u") == 0
    (row,) = capsys.readouterr().out.splitlines()[1:]
    assert row.split()[0] == ids["u0"]
    assert ids["event_u0"] in row
    assert "permanent_error" in row
    assert "PermanentError: cannot do u 0" in row

    assert await ctl("dead", "list", "--task", "t", "--reason", "max_attempts") == 0
    assert capsys.readouterr().out.strip() == "no dead letters (reason=max_attempts, task=t)"

    # An error over several lines, and longer than the column: one line, cut with "…".
    long_id = await pipe.redis.xadd(
        DEAD,
        {"reason": "handler_error", "task_type": "long", "error": "first\nsecond " + "x" * 100},
    )
    assert await ctl("dead", "list", "--task", "long") == 0
    (row,) = capsys.readouterr().out.splitlines()[1:]
    assert row.endswith("first second " + "x" * (ctl_mod.ERROR_WIDTH - 14) + "…"), row
    await pipe.redis.xdel(DEAD, long_id)

    assert await ctl("dead", "list", "--limit", "2") == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 3
    assert "more dead letters match" in out.err

    assert await ctl("dead", "list", "--json", "--limit", "0") == 0
    docs = orjson.loads(capsys.readouterr().out)
    assert [d["id"] for d in docs] == await pipe.dead_ids()
    by_id = {d["id"]: d for d in docs}
    assert by_id[ids["t1"]]["event_id"] == ids["event_t1"]
    assert by_id[ids["t1"]]["attempts"] == 1
    assert by_id[ids["no_envelope"]]["has_envelope"] is False

    assert await ctl("dead", "list", "--json", "--newest-first", "--reason", "permanent_error") == 0
    newest = [d["id"] for d in orjson.loads(capsys.readouterr().out)]
    assert newest == sorted([ids["t0"], ids["t1"], ids["u0"]], key=_id_key, reverse=True)


def _id_key(sid: str) -> tuple[int, int]:
    ms, seq = sid.split("-")
    return int(ms), int(seq)


async def test_scan_pages_through_the_stream_both_ways(pipe: Pipeline) -> None:
    added = [
        (await pipe.redis.xadd(DEAD, {"reason": "x", "n": str(i)})).decode() for i in range(20)
    ]
    forward = [dl.id async for dl in scan_dead(pipe.redis, DEAD, page=7)]
    backward = [dl.id async for dl in scan_dead(pipe.redis, DEAD, page=7, newest_first=True)]
    assert forward == added
    assert backward == added[::-1]


async def test_list_and_purge_a_stream_longer_than_a_page(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    async with pipe.redis.pipeline(transaction=False) as p:
        for i in range(1234):
            p.xadd(DEAD, {"reason": "bulk", "task_type": "t", "error": f"e{i}", "attempts": "1"})
        await p.execute()
    assert await ctl("dead", "list", "--limit", "0", "--json") == 0
    assert len(orjson.loads(capsys.readouterr().out)) == 1234
    assert await ctl("dead", "purge", "--all", "--yes") == 0
    assert capsys.readouterr().out.strip().endswith("purged 1234, failed 0")
    assert await pipe.redis.xlen(DEAD) == 0


async def test_restore_lost_publishes_again_the_events_whose_dead_letters_redis_lost(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    """Redis came back without two of the dead letters: their events, dead-lettered in
    Postgres, are published again once the cause is fixed, and complete. The third, whose
    dead letter is there, is left to `dead replay`; one dead-lettered a moment ago is left
    alone (its dead letter may be on its way)."""
    ids = await pipe.make_dead_letters()
    await pipe.pool.execute("UPDATE outbox SET dead_lettered_at = now() - interval '1 hour'")
    just_now = "UPDATE outbox SET dead_lettered_at = now() - $2::interval WHERE event_id = $1"
    await pipe.pool.execute(just_now, ids["event_u0"], timedelta(minutes=1))
    await pipe.redis.xdel(DEAD, ids["t0"], ids["u0"])  # lost, with their dedupe keys kept
    capsys.readouterr()

    assert await ctl("dead", "restore-lost", "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"would restore event {ids['event_t0']}" in out
    assert ids["event_u0"] not in out  # within the default 10 minutes
    assert out.strip().endswith(
        "would restore 1 dead-lettered event(s) whose dead letters are gone"
    )
    assert await ctl("dead", "restore-lost", "--older-than", "0s", "--dry-run") == 0
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith("would restore 2 dead-lettered event(s) whose dead letters are gone")
    )
    assert await ctl("dead", "restore-lost", "--older-than", "2h", "--yes") == 0
    assert "no dead-lettered event is missing" in capsys.readouterr().out

    assert await ctl("dead", "restore-lost", "--yes") == 0
    assert capsys.readouterr().out.strip().endswith("restored 1: the relay publishes them again")
    await pipe.pool.execute(just_now, ids["event_u0"], timedelta(hours=1))
    assert await ctl("dead", "restore-lost", "--yes") == 0
    assert capsys.readouterr().out.strip().endswith("restored 1: the relay publishes them again")
    for label in ("t0", "u0"):
        row = await pipe.row(ids[f"event_{label}"])
        assert row["dead_lettered_at"] is None and row["published_at"] is None
    assert (await pipe.row(ids["event_t1"]))["dead_lettered_at"] is not None

    pipe.handlers.fail = False
    while await pipe.relay.run_once():  # published again, past their old dedupe keys
        pass
    assert await pipe.work() == 2
    assert sorted(pipe.handlers.done) == [("t", 0), ("u", 0)]
    assert await ctl("dead", "restore-lost", "--yes") == 0
    assert "no dead-lettered event is missing" in capsys.readouterr().out


async def test_an_event_dead_lettered_before_its_relay_marked_it_published_is_restored(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    """A relay's XADD went through and its transaction did not (kill -9 before the mark):
    the row is unpublished when a worker gives up on its entry, moments later. The relay
    skips dead-lettered rows, so once Redis has lost the dead letter only restore-lost
    could publish the event again; it must find the row."""
    async with pipe.pool.acquire() as conn, conn.transaction():
        event_id = str(await enqueue(conn, "t", {"i": 0}))
    record = await pipe.pool.fetchrow(f"SELECT {ROW_COLUMNS} FROM outbox")  # noqa: S608
    assert record is not None
    await Publisher(pipe.redis, 86_400).publish([to_row(record)])  # the XADD, no mark
    assert await pipe.work() == 1  # PermanentError: dead-lettered
    row = await pipe.row(event_id)
    assert row["dead_lettered_at"] is not None
    assert row["published_at"] is not None  # the worker's mark says it was published
    await pipe.pool.execute("UPDATE outbox SET dead_lettered_at = now() - interval '1 hour'")
    await pipe.redis.flushall()  # Redis comes back without its data
    capsys.readouterr()
    assert await ctl("dead", "restore-lost", "--yes") == 0
    assert capsys.readouterr().out.strip().endswith("restored 1: the relay publishes them again")
    pipe.handlers.fail = False
    while await pipe.relay.run_once():
        pass
    assert await pipe.work() == 1
    assert pipe.handlers.done == [("t", 0)]


async def test_a_bulk_purge_shows_progress_while_it_counts_and_purges(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal, the count before the confirmation (seconds for a long stream) has a
    progress bar of its own, as the purge after it has."""
    async with pipe.redis.pipeline(transaction=False) as p:
        for i in range(1234):
            p.xadd(DEAD, {"reason": "bulk", "task_type": "t", "error": f"e{i}", "attempts": "1"})
        await p.execute()
    err = FakeTty()
    monkeypatch.setattr(sys, "stderr", err)
    assert await ctl("dead", "purge", "--all", "--yes") == 0
    shown = err.getvalue()
    assert re.search(r"counting: +\d+%.*/1234", shown), shown
    assert re.search(r"purge: +\d+%.*/1234", shown), shown
    assert await pipe.redis.xlen(DEAD) == 0


async def test_a_listing_piped_into_head_ends_quietly(
    pipe: Pipeline, pg_server: PostgresServer, redis_server: RedisServer
) -> None:
    """`outboxctl dead list | head`: the reader goes away, and that is no connection error
    (it printed one, exit 1); it ends as a shell command killed by SIGPIPE (141)."""
    async with pipe.redis.pipeline(transaction=False) as p:
        for i in range(3000):
            p.xadd(DEAD, {"reason": "bulk", "task_type": "t", "error": f"e{i}", "attempts": "1"})
        await p.execute()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.ctl", "dead", "list", "--limit", "0"],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATABASE_URL": pg_server.dsn,
            "REDIS_URL": redis_server.url,
        },
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    code = await asyncio.to_thread(proc.wait, 60)
    err = proc.stderr.read().decode()
    assert code == 141, err
    assert err == ""


async def test_show_one_dead_letter(pipe: Pipeline, capsys: pytest.CaptureFixture[str]) -> None:
    ids = await pipe.make_dead_letters()
    capsys.readouterr()

    assert await ctl("dead", "show", ids["t1"], "--json") == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["dead_letter"]["id"] == ids["t1"]
    assert doc["dead_letter"]["reason"] == "permanent_error"
    assert doc["envelope"]["id"] == ids["event_t1"]
    assert doc["envelope"]["payload"] == {"i": 1}
    assert doc["envelope_error"] is None
    assert doc["outbox"]["event_id"] == ids["event_t1"]
    assert doc["outbox"]["dead_lettered_at"] is not None
    assert "cannot do t 1" in doc["outbox"]["last_error"]

    assert await ctl("dead", "show", ids["t1"]) == 0
    text = capsys.readouterr().out
    assert f"id            {ids['t1']}" in text
    assert '    "payload": {\n      "i": 1\n    }' in text  # pretty JSON, indented
    assert re.search(rf"^  event_id +{ids['event_t1']}$", text, re.M)
    assert "outbox row:\n" in text

    assert await ctl("dead", "show", ids["no_envelope"], "--json") == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["envelope"] is None
    assert doc["envelope_error"] == "no 'e' field"
    assert doc["original_fields"] == {"other": "field"}
    assert doc["outbox"] is None

    assert await ctl("dead", "show", ids["garbage"]) == 0
    assert "envelope: (invalid: not JSON" in capsys.readouterr().out

    assert await ctl("dead", "show", "1-1") == 1
    assert "no dead letter 1-1" in capsys.readouterr().err
    assert await ctl("dead", "show", "nope") == 2


# -- replay --------------------------------------------------------------------------------


async def test_replay_one_then_the_worker_completes_it(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await pipe.make_dead_letters()
    event_id = ids["event_t0"]
    dead_fields = dict((await pipe.redis.xrange(DEAD, ids["t0"], ids["t0"]))[0][1])
    before = await pipe.row(event_id)
    stream_before = await pipe.redis.xlen(STREAM)
    capsys.readouterr()

    assert await ctl("dead", "replay", ids["t0"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "replayed 1, skipped 0, failed 0"

    assert ids["t0"] not in await pipe.dead_ids()
    assert len(await pipe.dead_ids()) == 4  # the others are untouched
    assert await pipe.redis.xlen(STREAM) == stream_before + 1
    new_id, fields = (await pipe.redis.xrevrange(STREAM, count=1))[0]
    assert fields == {b"e": dead_fields[b"e"]}  # the original envelope, byte for byte
    assert f"replayed {ids['t0']} -> {new_id.decode()}" in out
    row = await pipe.row(event_id)
    assert row["dead_lettered_at"] is None
    assert row["last_error"] is None
    assert row["completed_at"] is None
    assert row["stream_id"] == new_id.decode() != before["stream_id"]
    assert row["published_at"] > before["published_at"]
    assert await pipe.redis.get(dedupe_key(event_id)) == new_id

    pipe.handlers.fail = False
    assert await pipe.work() == 1
    assert pipe.handlers.done == [("t", 0)]
    assert (await pipe.row(event_id))["completed_at"] is not None


async def test_a_replay_redis_refuses_leaves_the_rows_dead_lettered_and_stops(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    """Redis refusing every write (here a replica, as after a failover: READONLY): the run
    stops at the first refusal, and the row it had revived is dead-lettered again, so the
    reconciler does not publish it beside the dead letter a later replay takes."""
    ids = await pipe.make_dead_letters()
    before = await pipe.row(ids["event_t0"])
    await pipe.redis.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    try:
        assert await ctl("dead", "replay", "--all", "--yes", "--quiet") == 1
    finally:
        await pipe.redis.execute_command("REPLICAOF", "NO", "ONE")
    out, err = capsys.readouterr()
    summary = out.splitlines()[-1]
    assert summary.startswith("replayed 0, ") and summary.endswith(", failed 1"), summary
    assert "READONLY" in err or "read only replica" in err  # Redis 6's text, Redis 7's
    assert len(await pipe.dead_ids()) == 5
    revived = await pipe.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE dead_lettered_at IS NULL AND completed_at IS NULL"
    )
    assert revived == 0
    row = await pipe.row(ids["event_t0"])
    assert row["last_error"] == before["last_error"]
    # The operator replays again once Redis takes writes: each event once.
    assert await ctl("dead", "replay", "--all", "--yes", "--quiet") == 0
    assert await pipe.work() == 3


async def test_an_interrupted_replay_does_not_rebury_what_a_concurrent_replay_put_back(
    pipe: Pipeline,
) -> None:
    """Operator A's replay is interrupted before its script runs; while A checks whether
    the dead letter is still there, operator B replays the same dead letter to the end.
    A must not mark dead-lettered a row whose event is back in the stream."""

    ids = await pipe.make_dead_letters()
    dead_id = ids["t0"]
    dl = await pipe.dead_letter(dead_id)
    real = StreamQueue(pipe.redis, "default")

    class RacingRedis:
        async def xrange(self, *a: Any, **k: Any) -> Any:
            found = await pipe.redis.xrange(*a, **k)  # the dead letter is still there
            assert await replay_one(pipe.pool, real, dl) is not None  # B, to the end
            return found

    class Interrupted:
        dead = real.dead
        redis = RacingRedis()

        async def replay_dead(self, *a: Any) -> Any:
            raise KeyboardInterrupt  # Ctrl-C before the script went out

    with pytest.raises(KeyboardInterrupt):
        await replay_one(pipe.pool, Interrupted(), dl)  # type: ignore[arg-type]
    row = await pipe.row(ids["event_t0"])
    assert dead_id not in await pipe.dead_ids()  # B's replay went through
    assert row["dead_lettered_at"] is None, "in the stream, yet dead-lettered in Postgres"


async def test_a_replay_that_loses_its_dead_letter_to_a_purge_leaves_the_event_given_up(
    pipe: Pipeline,
) -> None:
    """A purge takes the dead letter between a replay's revive and its script: the replay
    finds nothing to put back, and the row goes back to dead-lettered instead of staying
    in flight for the reconciler to publish the purged event."""
    ids = await pipe.make_dead_letters()
    dead_id = ids["t0"]
    dl = await pipe.dead_letter(dead_id)
    real = StreamQueue(pipe.redis, "default")

    class PurgedMeanwhile:
        dead = real.dead
        redis = real.redis

        async def replay_dead(self, *args: Any) -> Any:
            assert await ctl("dead", "purge", dead_id, "--quiet") == 0
            return await real.replay_dead(*args)

    assert await replay_one(pipe.pool, PurgedMeanwhile(), dl) is None  # type: ignore[arg-type]
    row = await pipe.row(ids["event_t0"])
    assert row["dead_lettered_at"] is not None


async def test_a_replayed_event_the_worker_dead_letters_again_before_step_3_stays_given_up(
    pipe: Pipeline,
) -> None:
    """The worker reads the replayed entry and dead-letters it again (its cause is not
    fixed) between the replay's script and its step 3. Step 3 must not clear that mark:
    the row would be in flight while its event sits in the dead letters, and once the
    acknowledged entry is trimmed the reconciler would publish it a second time."""
    ids = await pipe.make_dead_letters()
    dl = await pipe.dead_letter(ids["t0"])
    real = StreamQueue(pipe.redis, "default")

    class WorkerBetween:
        dead = real.dead
        redis = real.redis

        async def replay_dead(self, *args: Any) -> Any:
            new_id = await real.replay_dead(*args)
            assert await pipe.work() == 1  # fails again: dead-lettered again
            return new_id

    new_id = await replay_one(pipe.pool, WorkerBetween(), dl)  # type: ignore[arg-type]
    row = await pipe.row(ids["event_t0"])
    assert row["dead_lettered_at"] is not None, "dead-lettered in Redis, in flight in Postgres"
    assert row["last_error"] is not None
    assert row["stream_id"] == new_id  # the entry it was given up on
    # A later replay (the cause fixed) puts it back once, and it completes.
    (again,) = [d for d in await pipe.dead_ids() if d not in ids.values()]
    pipe.handlers.fail = False
    assert await replay_one(pipe.pool, real, await pipe.dead_letter(again)) is not None
    assert await pipe.work() == 1
    assert pipe.handlers.done == [("t", 0)]


async def test_a_replay_whose_last_step_failed_is_not_published_twice_by_the_reconciler(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postgres fails the replay's last step (the row pointed at the new entry) for an event
    whose dedupe key has expired (published more than RELAY_DEDUPE_TTL_SECONDS ago): the
    row still names the old, acknowledged entry. Once that entry is trimmed, the
    reconciler's republish must find the replayed one, not add a second."""
    (event_id,) = await pipe.publish(1)
    assert await pipe.work() == 1  # dead-lettered
    await pipe.redis.delete(dedupe_key(event_id, "default"))  # expired
    (dead_id,) = await pipe.dead_ids()
    real_execute = asyncpg.pool.Pool.execute

    async def track_fails(pool: Any, query: str, *args: Any, **kw: Any) -> str:
        if query == ctl_mod._TRACK:
            raise asyncpg.PostgresError("connection lost at step 3")
        return await real_execute(pool, query, *args, **kw)

    monkeypatch.setattr(asyncpg.pool.Pool, "execute", track_fails)
    queue = StreamQueue(pipe.redis, "default")
    with pytest.raises(asyncpg.PostgresError):
        await replay_one(pipe.pool, queue, await pipe.dead_letter(dead_id))
    monkeypatch.undo()
    row = await pipe.row(event_id)
    (old, _), (replayed, _) = await pipe.redis.xrange(STREAM)
    assert row["stream_id"] == old.decode()  # step 3 never ran
    await pipe.redis.xdel(STREAM, old)  # trimmed
    await pipe.pool.execute("UPDATE outbox SET published_at = now() - interval '1 hour'")
    reconciler = Reconciler(pipe.pool, pipe.redis, pipe.relay.publisher, after_seconds=0.0)
    await reconciler.run_once()
    assert [sid for sid, _ in await pipe.redis.xrange(STREAM)] == [replayed]
    assert (await pipe.row(event_id))["stream_id"] == replayed.decode()


async def test_replay_all_needs_yes_then_skips_what_has_no_envelope(
    pipe: Pipeline, pg_server: PostgresServer, redis_server: RedisServer
) -> None:
    ids = await pipe.make_dead_letters()
    env = {"DATABASE_URL": pg_server.dsn, "REDIS_URL": redis_server.url}

    refused = run_module(env, "dead", "replay", "--all")  # stdin is not a terminal
    assert refused.returncode == 2
    assert "pass --yes" in refused.stderr
    dry = run_module(env, "dead", "replay", "--all", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1] == "dry run: would replay 3, skipped 2, failed 0"
    assert len(await pipe.dead_ids()) == 5
    assert (
        await pipe.pool.fetchval("SELECT count(*) FROM outbox WHERE dead_lettered_at IS NULL") == 0
    )

    done = run_module(env, "dead", "replay", "--all", "--yes")
    # Skipped entries are reported but are not failures: exit 0.
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "replayed 3, skipped 2, failed 0"
    assert f"skipped {ids['no_envelope']}: no envelope" in done.stdout
    assert f"skipped {ids['garbage']}: envelope does not decode" in done.stdout
    assert "Traceback" not in done.stderr
    assert sorted(await pipe.dead_ids()) == sorted([ids["garbage"], ids["no_envelope"]])
    assert (
        await pipe.pool.fetchval("SELECT count(*) FROM outbox WHERE dead_lettered_at IS NULL") == 3
    )

    pipe.handlers.fail = False
    assert await pipe.work() == 3
    assert sorted(pipe.handlers.done) == [("t", 0), ("t", 1), ("u", 0)]
    assert await pipe.pool.fetchval("SELECT count(*) FROM outbox WHERE completed_at IS NULL") == 0


async def test_replay_by_task_asks_on_a_terminal(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = await pipe.make_dead_letters()
    monkeypatch.setattr(sys, "stdin", FakeTty("n\n"))
    assert await ctl("dead", "replay", "--task", "t") == 1
    assert "aborted" in capsys.readouterr().err
    assert len(await pipe.dead_ids()) == 5

    monkeypatch.setattr(sys, "stdin", FakeTty("y\n"))
    assert await ctl("dead", "replay", "--task", "t", "--quiet") == 0
    out = capsys.readouterr()
    assert "replay 2 dead letter(s) (task=t)? [y/N]" in out.err
    assert out.out.strip() == "replayed 2, skipped 0, failed 0"  # --quiet: no per-item lines
    assert sorted(await pipe.dead_ids()) == sorted([ids["u0"], ids["garbage"], ids["no_envelope"]])


def _prompted_replay(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """`outboxctl dead replay --task t` on a terminal (a pty), once it asks [y/N]; the pty's
    master end is returned to answer through."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.ctl", "dead", "replay", "--task", "t", "--quiet"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        cwd=ROOT,
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    assert proc.stderr is not None
    seen = b""
    while b"[y/N]" not in seen:
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, f"ended before asking: {seen!r}"
        seen += chunk
    return proc, master


# `dead replay` whose first step (the outbox row revived) answers only once a Ctrl-C has
# come (the main task cancelled; at most 30 s), after its commit: the Ctrl-C lands between
# two steps of one replay.
_SLOW_REVIVE = """
import asyncio, sys, time
import asyncpg.pool
from shared import ctl

real = asyncpg.pool.Pool.fetchrow

async def slow(self, query, *args, **kw):
    row = await real(self, query, *args, **kw)
    if query == ctl._REVIVE:
        print("revived", flush=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(t.cancelling() for t in asyncio.all_tasks()):
                break
            await asyncio.sleep(0.01)
    return row

asyncpg.pool.Pool.fetchrow = slow
sys.exit(ctl.main(sys.argv[1:]))
"""


async def test_ctrl_c_during_a_replay_finishes_that_one_and_stops(
    pipe: Pipeline, pg_server: PostgresServer, redis_server: RedisServer
) -> None:
    """Cut off after its first step, a replay left the row in flight (no longer
    dead-lettered) beside its dead letter: the reconciler would publish the event once its
    old entry was trimmed, and replaying the dead letter again would run it twice. The
    dead letter being replayed is finished; the command stops before the next."""
    first, second = await pipe.publish(2)
    assert await pipe.work() == 2  # both dead-lettered
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL": pg_server.dsn,
        "REDIS_URL": redis_server.url,
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_REVIVE, "dead", "replay", "--all", "--yes", "--quiet"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line == b"revived\n", line
        proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(proc.wait, 30)
        out = proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130, out
    assert out.strip() == "replayed 1, skipped 0, failed 0"
    (left,) = [await pipe.dead_letter(d) for d in await pipe.dead_ids()]
    replayed = first if left.text("event_id") == second else second
    row = await pipe.row(replayed)
    assert row["dead_lettered_at"] is None
    newest, _ = (await pipe.redis.xrange(STREAM))[-1]
    assert row["stream_id"] == newest.decode()  # the row names its new entry
    assert (await pipe.row(left.text("event_id")))["dead_lettered_at"] is not None


async def test_ctrl_c_at_the_prompt_interrupts_at_once(
    pipe: Pipeline, pg_server: PostgresServer, redis_server: RedisServer
) -> None:
    """The first Ctrl-C at [y/N] ends the command (a readline blocking the event loop let
    asyncio take it to cancel a task that could not run: it did nothing). An answer typed
    on the terminal is still read."""
    await pipe.make_dead_letters()
    env = {"DATABASE_URL": pg_server.dsn, "REDIS_URL": redis_server.url}
    proc, master = await asyncio.to_thread(_prompted_replay, env)
    try:
        proc.send_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
        try:
            code = await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("still waiting for an answer 10 s after Ctrl-C") from None
    finally:
        os.close(master)
    assert proc.stderr is not None
    assert code == 130
    assert "interrupted" in proc.stderr.read().decode()
    assert len(await pipe.dead_ids()) == 5

    proc, master = await asyncio.to_thread(_prompted_replay, env)
    try:
        os.write(master, b"y\n")
        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        os.close(master)
    assert proc.stdout is not None
    assert code == 0
    assert proc.stdout.read().decode().strip() == "replayed 2, skipped 0, failed 0"
    assert len(await pipe.dead_ids()) == 3


# Waits for an answer as the prompt does, then has a thread other than the main one take a
# SIGINT (as the kernel may hand a Ctrl-C to any thread of a process; a library's thread,
# tqdm's monitor, was there at the prompt).
_CTRL_C_ON_ANOTHER_THREAD = """
import asyncio, os, signal, sys, threading
from shared.ctl import _line_ready

async def main():
    read_end, _write_end = os.pipe()
    loop = asyncio.get_running_loop()
    waiting = threading.Event()
    def press():
        waiting.wait()
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    threading.Thread(target=press, daemon=True).start()
    loop.call_later(0.2, waiting.set)  # the main thread is in epoll_wait by then
    try:
        await _line_ready(os.fdopen(read_end))
    except KeyboardInterrupt:
        print("interrupted", flush=True)

asyncio.run(main())
"""


# The answer and a Ctrl-C both waiting when the loop next polls: one turn hands over both.
_CTRL_C_WITH_THE_ANSWER = """
import asyncio, os, signal
from shared.ctl import _line_ready

async def main():
    read_end, write_end = os.pipe()

    def press():  # once it waits for the answer, before the loop polls again
        os.write(write_end, b"y\\n")
        signal.raise_signal(signal.SIGINT)

    asyncio.get_running_loop().call_soon(press)
    try:
        await _line_ready(os.fdopen(read_end))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    else:
        print("answered", flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize(
    "script",
    [_CTRL_C_WITH_THE_ANSWER, _CTRL_C_ON_ANOTHER_THREAD],
    ids=["with_the_answer", "another_thread"],
)
def test_a_ctrl_c_at_the_prompt_always_interrupts(script: str) -> None:
    """with_the_answer: a Ctrl-C that reached the process with the answer was dropped (the
    line resolved the wait first, the handler was gone when the signal's turn came, and the
    command went on to replay or purge). another_thread: the handler asyncio.run() installs
    for Ctrl-C runs only when the main thread next runs Python code; a SIGINT taken by
    another thread, with the main thread asleep in epoll_wait, did not wake it, and the
    prompt waited on for ever (the Ctrl-C test failed that way, now and then, in full runs).
    It comes through the event loop's wakeup fd now."""
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert run.stdout.strip() == "interrupted", run.stdout + run.stderr


async def test_replay_ids_counts_missing_as_failed_and_skips_garbage(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await pipe.make_dead_letters()
    capsys.readouterr()
    assert await ctl("dead", "replay", ids["garbage"], "1-1", ids["u0"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "replayed 1, skipped 1, failed 1"
    assert "failed 1-1: no such dead letter" in out
    assert ids["garbage"] in await pipe.dead_ids()
    assert ids["u0"] not in await pipe.dead_ids()


# -- purge ---------------------------------------------------------------------------------


async def test_purge_by_id_and_by_age(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An entry that failed in 1970 (ids only grow, so it goes in first).
    old = (await pipe.redis.xadd(DEAD, {"reason": "ancient"}, id="1000-0")).decode()
    ids = await pipe.make_dead_letters()
    capsys.readouterr()

    async def outbox_events() -> set[str]:
        return {str(r["event_id"]) for r in await pipe.pool.fetch("SELECT event_id FROM outbox")}

    assert await ctl("dead", "purge", ids["t0"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "purged 1, failed 0"
    assert ids["t0"] not in await pipe.dead_ids()
    assert await pipe.redis.xlen(DEAD) == 5
    # Given up on for good: the event's outbox row goes too, the others stay.
    assert await outbox_events() == {ids["event_t1"], ids["event_u0"]}

    assert await ctl("dead", "purge", "1-1") == 1  # not there
    assert "failed 1-1: no such dead letter" in capsys.readouterr().out

    assert await ctl("dead", "purge", "--older-than", "7d") == 2  # not a terminal, no --yes
    assert await pipe.redis.xlen(DEAD) == 5

    assert await ctl("dead", "purge", "--older-than", "7d", "--yes") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "purged 1, failed 0"
    assert old not in await pipe.dead_ids()
    assert await pipe.redis.xlen(DEAD) == 4  # the recent ones stay

    assert await ctl("dead", "purge", "--older-than", "1h", "--yes") == 0
    assert "no dead letters match" in capsys.readouterr().out
    assert await pipe.redis.xlen(DEAD) == 4

    # The operator's clock is two hours ahead of Redis's: the ages are still Redis's.
    skewed = time.time() + 7200
    monkeypatch.setattr(time, "time", lambda: skewed)
    assert await ctl("dead", "purge", "--older-than", "1h", "--yes") == 0
    assert "no dead letters match" in capsys.readouterr().out
    assert await pipe.redis.xlen(DEAD) == 4

    assert await ctl("dead", "purge", "--older-than", "7x") == 2
    assert "invalid duration" in capsys.readouterr().err

    assert await ctl("dead", "purge", "--all", "--yes", "--dry-run") == 0
    assert await pipe.redis.xlen(DEAD) == 4
    assert await ctl("dead", "purge", "--all", "--yes", "--quiet") == 0
    assert await pipe.redis.xlen(DEAD) == 0
    assert await outbox_events() == set()


# -- configuration and errors --------------------------------------------------------------


async def test_bad_configuration_and_usage_exit_2(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL")
    assert await ctl("status") == 2
    err = capsys.readouterr().err
    assert err.startswith("outboxctl: invalid configuration: DATABASE_URL")
    assert len(err.strip().splitlines()) == 1

    monkeypatch.setenv("DATABASE_URL", "postgresql://h/db")
    monkeypatch.setenv("REDIS_URL", "http://h")
    assert await ctl("dead", "list") == 2
    assert "REDIS_URL" in capsys.readouterr().err

    monkeypatch.setenv("REDIS_URL", "redis://h")
    monkeypatch.setenv("QUEUE", "no spaces allowed")
    assert await ctl("dead", "list") == 2
    assert "QUEUE" in capsys.readouterr().err

    monkeypatch.delenv("QUEUE")
    assert await ctl() == 2
    assert await ctl("dead", "replay") == 2
    assert "give dead-letter IDs" in capsys.readouterr().err
    assert await ctl("dead", "replay", "1-0", "--all") == 2
    assert await ctl("dead", "purge", "--all", "--older-than", "1d") == 2
    assert await ctl("dead", "list", "--limit", "-1") == 2


async def test_odd_ids_and_durations_are_read_as_redis_reads_them_or_refused(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    """An id with leading zeros is the id Redis makes of it, so the purge reports what it
    did; a duration too long, a non-ASCII digit or a trailing newline is a usage error, not
    a traceback or a Redis error (found by review)."""
    await pipe.redis.xadd(DEAD, {"reason": "x"}, id="5-0")
    capsys.readouterr()
    assert await ctl("dead", "purge", "05-0", "5-0") == 0
    assert await pipe.redis.xlen(DEAD) == 0
    assert "purged 1, failed 0" in capsys.readouterr().out
    for bad in ("5-0\n", "\u0665-0", f"{2**64}-0", "5", "9" * 4400 + "-0"):
        assert await ctl("dead", "purge", bad) == 2
        assert "not a stream id" in capsys.readouterr().err
    assert await ctl("dead", "purge", "0" * 4400 + "5-0") == 1  # 5-0, purged above
    assert "failed 5-0: no such dead letter" in capsys.readouterr().out
    for bad in ("99999999999w", "7d\n1", "\u0667d"):
        assert await ctl("dead", "purge", "--older-than", bad, "--dry-run") == 2
        assert "duration" in capsys.readouterr().err


def test_unreachable_redis_is_one_line(pg_server: PostgresServer) -> None:
    out = run_module(
        {"DATABASE_URL": pg_server.dsn, "REDIS_URL": f"redis://:s3cret@127.0.0.1:{free_port()}/0"},
        "dead",
        "list",
    )
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("outboxctl: cannot reach Redis at 127.0.0.1:")
    assert "s3cret" not in out.stderr


async def test_unreachable_postgres_is_one_line(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://u:hunter2@127.0.0.1:{free_port()}/db")
    assert await ctl("status") == 1
    err = capsys.readouterr().err
    assert err.startswith("outboxctl: cannot reach Postgres at 127.0.0.1:")
    assert len(err.strip().splitlines()) == 1
    assert "hunter2" not in err
