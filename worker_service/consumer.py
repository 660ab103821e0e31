"""The consumer: reads a queue's stream in a consumer group and runs handlers.

Flow of one entry: XREADGROUP (or XCLAIM of a due retry or of a dead worker's entry) ->
decode the envelope -> run the handler under its timeout -> on success, record completion
in Postgres, then XACK (both batched); on a transient failure, park the entry for its
backoff; after the last attempt, on a "do not retry" error, an undecodable entry or an
unknown task type, XADD it to the dead-letter stream and XACK it in one script, which
first checks that this worker still holds it.

While a handler runs, the worker renews its claim on the entry every third of the
visibility timeout, so no other worker takes over a slow but live handler.

An orphan (an entry whose worker stopped with no outcome: it crashed, stalled past the
visibility timeout, or restarted) runs alone: the worker takes one over, holds it while
what it runs ends (starting no new read), runs it, and only then takes new work. The
entry that killed its worker then kills no other entry with it: only its own delivery
count grows, and past WORKER_MAX_CRASH_DELIVERIES deliveries (retries included; or
max_attempts, if lower), the last run alone, it is dead-lettered, while the entries that
were in flight beside it run, each alone, and complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared.autopipeline import AutoPipelineRedis
from shared.constants import RETRY_PARKING_CONSUMER
from shared.envelope import Envelope
from shared.errors import EnvelopeError, PermanentError
from shared.lifecycle import (
    FINISH_UNCUT_SECONDS,
    LOOP_ERRORS,
    STOP_FLOOR_SECONDS,
    backoff_delay,
    cancel_requested,
    cancellation_spent,
    finish_anyway,
    finishing_uncut,
    forget_spent,
)
from shared.logs import request_id_var
from shared.outbox import dead_letter_error
from worker_service import metrics
from worker_service.queue import Entry, PendingInfo, StreamQueue, retry_delay
from worker_service.router import Route, Router, TaskContext
from worker_service.settings import WorkerSettings

logger = logging.getLogger(__name__)

_MARK_COMPLETED = """
UPDATE outbox SET completed_at = now()
WHERE event_id = ANY($1::uuid[]) AND completed_at IS NULL
"""
# With the entry given up on: a replay that put the event back as that entry (and is
# about to record it, shared.ctl._TRACK) then knows the mark is about it, not older. And
# published, as it was: a relay that died after its XADD, before its mark, leaves the row
# unpublished, and the relay skips dead-lettered rows, so only `outboxctl dead
# restore-lost` could publish it again after Redis lost its dead letter, and that command
# takes published rows only (an unpublished one is migration 002's, which never reached
# the stream).
# Not over a mark about this same entry: another worker that took the entry over (this
# one stalled between its renewal and here) has marked it and written its dead letter; a
# second mark, taken back below when its dead letter is refused, would erase that one.
_MARK_DEAD = """
UPDATE outbox SET dead_lettered_at = now(), last_error = $2, stream_id = $3,
    published_at = coalesce(published_at, now())
WHERE event_id = $1::uuid AND completed_at IS NULL
  AND (dead_lettered_at IS NULL OR stream_id IS DISTINCT FROM $3)
RETURNING dead_lettered_at
"""
# The mark taken back when the dead letter could not follow it: the entry was taken over
# meanwhile. Only that mark ($2, its time): one its new holder made since stays.
_UNMARK_DEAD = """
UPDATE outbox SET dead_lettered_at = NULL, last_error = NULL
WHERE event_id = $1::uuid AND completed_at IS NULL AND dead_lettered_at = $2
"""


# Pages of the pending list one reclaim pass reads at most, per scan.
RECLAIM_SCAN_PAGES = 10
ACK_LINGER_SECONDS = 0.002
ACK_BATCH = 256
TIMEOUT_SWEEP_SECONDS = 0.1


class Worker:
    """One consumer in the group; start()/stop() and run_once() for tests."""

    name = "worker"

    def __init__(
        self,
        router: Router,
        pool: asyncpg.Pool[Any],
        redis: aioredis.Redis,
        settings: WorkerSettings,
        *,
        bookkeeping: asyncpg.Pool[Any] | None = None,
    ) -> None:
        self.router = router
        self.pool = pool  # the handlers'
        # The worker's own writes (completions, dead-letter marks), apart from the pool the
        # handlers hold through their work (the email handler through SMTP): with every
        # handler connection taken, they would wait behind the handlers queued for one.
        self.bookkeeping = bookkeeping or pool
        self.redis = redis
        # What handlers get: the same pool, their commands in one turn sent as one pipeline.
        self.handler_redis = AutoPipelineRedis(connection_pool=redis.connection_pool)
        self.settings = settings
        self.consumer = settings.consumer_name
        self.queue = StreamQueue(redis, settings.queue)
        self.state: dict[str, Any] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._deliveries: dict[str, int] = {}  # of the entries in flight
        # Orphans (see the module doc): the one running alone, the one taken over and
        # waiting for what runs to end (its claim renewed meanwhile), whether the worker is
        # taking no new work for one, and where this consumer's own pending entries from
        # before a restart go on (None: all looked at).
        self._orphan: Entry | None = None
        self._held_orphan: Entry | None = None
        self._draining = False
        self._own_after: str | None = None
        self._reclaim_now = asyncio.Event()  # the next reclaim pass, without its interval
        self._reading = False  # an XREADGROUP for new entries is under way
        self._flushing: set[str] = set()  # entries whose completion is being recorded
        # Per reclaim scan, where its next pass goes on in the pending list ("-": the start).
        self._scan_from: dict[str, str] = {}
        self._deadlines: dict[str, tuple[float, asyncio.Task[Any]]] = {}  # running handlers
        self._timed_out: set[str] = set()
        # Handlers running their entry's last attempt: how to give each up, should it
        # ignore its timeout's cancellation (see stop()).
        self._last_attempts: dict[str, Callable[[], Awaitable[None]]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._read_watermark = max(1, settings.concurrency // 4)
        self._slot_free = asyncio.Event()
        self._acks: list[tuple[str, str | None]] = []  # (entry id, event id)
        self._ack_ready = asyncio.Event()
        self._stopping = asyncio.Event()  # set: take no new work
        self._closing = asyncio.Event()  # set: the loops end (after in-flight work)
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._app_started = False

    # -- lifecycle ---------------------------------------------------------------------

    async def setup(self) -> None:
        """Create the group if missing and run the app's startup hooks."""
        await self.queue.ensure_group()
        if not self._app_started:
            for hook in self.router.startup_hooks:
                await hook(self.state)
            self._app_started = True

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._stopping.clear()
        await self.setup()
        # Entries this consumer name held before a restart come first: orphans, run one at
        # a time by the first reclaim passes before anything new is read.
        self._own_after = "0"
        self._reclaim_now.set()
        # Fetching and reclaiming end when the worker stops taking work; acks and claim
        # renewals go on until the work in flight is over.
        steps = {
            "fetch": (self._fetch_step, self._stopping),
            "reclaim": (self._reclaim_step, self._stopping),
            "ack": (self._ack_step, self._closing),
            "heartbeat": (self._heartbeat_step, self._closing),
        }
        self._closing.clear()
        self._tasks = [
            asyncio.create_task(self._supervise(name, step, until), name=f"worker-{name}")
            for name, (step, until) in steps.items()
        ]
        logger.info("worker_started", extra={"consumer": self.consumer, "queue": self.queue.queue})

    @property
    def running(self) -> bool:
        return self._started and all(not t.done() for t in self._tasks)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop reading, let handlers finish within grace, hand the rest back, flush acks.

        All of it within `grace` (and a second or so of bookkeeping): the read in progress,
        the handlers and the last acknowledgements share one deadline.
        """
        if not self._started:
            await self._shutdown_app()
            return
        deadline = time.monotonic() + grace
        self._started = False
        self._stopping.set()
        self._slot_free.set()
        self._reclaim_now.set()
        loops, self._tasks = self._tasks, []
        # A read in progress returns within block_ms; what it brings is run like the rest.
        takers = loops[:2]
        _done, late = await asyncio.wait(
            takers, timeout=min(self.settings.block_ms / 1000 + 1, max(0.1, grace))
        )
        for t in late:
            t.cancel()
        await asyncio.gather(*takers, return_exceptions=True)
        stuck: list[str] = []
        counts: dict[str, int] = {}
        running_orphan = self._orphan
        if self._inflight:
            # Claims are still renewed meanwhile: the heartbeat runs until _closing.
            _done, pending = await asyncio.wait(
                list(self._inflight.values()), timeout=max(0.0, deadline - time.monotonic())
            )
            if pending:
                stuck_tasks = {eid: t for eid, t in self._inflight.items() if t in pending}
                stuck = list(stuck_tasks)
                counts = {
                    eid: self._count_at_stop(eid, self._deliveries.get(eid, 1)) for eid in stuck
                }
                logger.warning("worker_handlers_cancelled", extra={"entries": stuck})
                uncut = {t for t in pending if finishing_uncut(t)}
                for t in pending:
                    t.cancel()
                # A handler may swallow its cancellation: it is left behind, not waited for.
                # One finishing a step that must not be cut (an email the SMTP server may
                # have taken, and its record) is given FINISH_UNCUT_SECONDS more.
                _done, deaf = await asyncio.wait(pending, timeout=STOP_FLOOR_SECONDS)
                if uncut & deaf:
                    _done, late = await asyncio.wait(uncut & deaf, timeout=FINISH_UNCUT_SECONDS)
                    deaf = (deaf - uncut) | late
                # A handler that ended without a cancellation recorded its own outcome (an
                # acknowledgement, a retry, a dead letter): nothing to hand back.
                stuck = [e for e, t in stuck_tasks.items() if not t.done() or t.cancelled()]
                if deaf:
                    deaf_ids = [e for e, t in stuck_tasks.items() if t in deaf]
                    logger.error("worker_handlers_ignore_cancellation", extra={"entries": deaf_ids})
                    # One on its last attempt, past its timeout, never reaches the attempts
                    # check (it never returns): handed back, it would hold a slot in worker
                    # after worker for ever. It is given up on here.
                    for eid in deaf_ids:
                        give_up = self._last_attempts.pop(eid, None)
                        if give_up is not None and eid in self._timed_out:
                            # Within the grace, as the rest of the stop (Postgres may be
                            # what the handler hangs on); not done, it is handed back.
                            left = max(STOP_FLOOR_SECONDS, deadline - time.monotonic())
                            try:
                                await asyncio.wait_for(give_up(), left)
                            except TimeoutError:
                                # Still under way (it is shielded): not handed back beside
                                # it. Done or not, the entry is safe: dead-lettered and
                                # acknowledged, or left pending for a takeover.
                                pass
                            except Exception:
                                # Not recorded (Postgres or Redis refused): handed back with
                                # the rest, pending as a failed dead-lettering leaves it.
                                logger.exception("worker_give_up_failed", extra={"entry_id": eid})
                                continue
                            stuck.remove(eid)
        self._closing.set()
        self._ack_ready.set()
        _done, still = await asyncio.wait(
            loops[2:], timeout=min(5.0, max(1.0, deadline - time.monotonic()))
        )
        for t in still:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        try:
            await asyncio.wait_for(
                finish_anyway(self._flush_acks(), "worker_ack_failed_after_cancel"),
                max(STOP_FLOOR_SECONDS, deadline - time.monotonic()),
            )
        except Exception:
            # Their work is done; the entries stay pending and are taken over after the
            # visibility timeout (the handlers are idempotent). The rest of the stop goes on.
            logger.exception("worker_final_ack_failed", extra={"entries": len(self._acks)})
        # Others may take these at once instead of after the visibility timeout: orphans
        # left idle with this consumer, to be taken over as orphans again (run alone), the
        # rest parked as due retries. An orphan taken but not yet run is uncounted too (it
        # stayed held, and renewed, until the heartbeat ended).
        held_orphan, self._held_orphan = self._held_orphan, None
        back: dict[str, int] = {}
        if held_orphan is not None:
            back[held_orphan.id] = held_orphan.deliveries - 1
        if running_orphan is not None and running_orphan.id in stuck:
            back[running_orphan.id] = self._count_at_stop(
                running_orphan.id, running_orphan.deliveries
            )

        async def hand_back() -> None:
            with contextlib.suppress(Exception):
                await self.queue.hand_back_orphans(self.consumer, list(back), back)
            with contextlib.suppress(Exception):
                await self.queue.park_for_retry(
                    self.consumer,
                    [i for i in stuck if i not in back],
                    due_now=True,
                    deliveries=counts,
                )
            with contextlib.suppress(Exception):
                # Handed back uncounted, a delivery's count comes round again: the mark of
                # an orphan cut short (its timeout may have ended its isolation) must not
                # match it.
                await self.queue.clear_alone_marks(stuck)

        # Within the grace: with Redis hanging each call would wait out the socket timeout.
        # Not handed back, the entries stay pending here and are taken over after the
        # visibility timeout instead of at once.
        try:
            await asyncio.wait_for(
                hand_back(), max(STOP_FLOOR_SECONDS, deadline - time.monotonic())
            )
        except TimeoutError:
            logger.warning("worker_hand_back_timed_out", extra={"entries": len(stuck)})
        await self._shutdown_app()
        logger.info("worker_stopped", extra={"consumer": self.consumer})

    async def _shutdown_app(self) -> None:
        if self._app_started:
            self._app_started = False
            for hook in self.router.shutdown_hooks:
                try:
                    await hook(self.state)
                except Exception:
                    logger.exception("app_shutdown_hook_failed")

    # -- one step, for tests -----------------------------------------------------------

    async def run_once(self, block_ms: int | None = None) -> int:
        """Read one batch (or take over one orphan, which runs alone), run it to the end,
        flush acks; the number of entries run."""
        entries = await self.reclaim_once()
        if not self._isolating:
            entries += await self.queue.read(self.consumer, self.settings.read_count, block_ms)
        await self._take(entries)
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        await self._flush_acks()
        return len(entries)

    # -- loops -------------------------------------------------------------------------

    def _count_at_stop(self, entry_id: str, deliveries: int) -> int:
        """The delivery count an entry a stop cut short is handed back with. That delivery
        was no attempt: one less. Not one its timeout had ended already: that attempt was
        made (uncounted, a handler that never gives way would run as attempt 1 for ever)."""
        return deliveries - (entry_id not in self._timed_out)

    async def _supervise(
        self, name: str, step: Callable[[], Awaitable[None]], until: asyncio.Event
    ) -> None:
        """Run step() until `until` is set: errors are logged, counted and backed off.

        The loop ends on the flag, and on a cancellation even when redis-py hid it (see
        cancel_requested).
        """
        failures = 0
        while not until.is_set():
            if cancel_requested():
                raise asyncio.CancelledError
            try:
                await step()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                if until.is_set():
                    break
                if cancel_requested():
                    raise asyncio.CancelledError from None
                failures += 1
                LOOP_ERRORS.labels(f"worker-{name}").inc()
                logger.exception("worker_loop_failed", extra={"loop": name, "failures": failures})
                await self._pause(backoff_delay(failures, 0.1, 10.0), until)

    @property
    def _isolating(self) -> bool:
        """An orphan runs or waits to: take no new work."""
        return self._orphan is not None or self._draining or self._own_after is not None

    def _busy(self) -> bool:
        """Work an orphan must not run beside: a live handler, a read under way (it would
        start what it brings), completions not yet recorded (the orphan may kill the
        process before they are, and they would run again). Not a handler its timeout
        cancelled that does not give way (it swallows the cancellation, or its cleanup
        hangs): it could hold the orphan back for ever."""
        return (
            self._reading
            or bool(self._flushing)
            or bool(self._acks)
            or any(eid not in self._timed_out for eid in self._inflight)
        )

    def _holding(self) -> set[str]:
        """The entries this worker holds: running, completed but not yet acknowledged, and
        the orphan it waits to run. Their claims are renewed; they are no orphans."""
        held = set(self._inflight) | {sid for sid, _ in self._acks} | self._flushing
        if self._held_orphan is not None:
            held.add(self._held_orphan.id)
        return held

    def _is_orphan(self, entry_id: str) -> bool:
        """The entry is the orphan running alone."""
        return self._orphan is not None and self._orphan.id == entry_id

    def _handler_over(self, entry_id: str) -> None:
        """A handler ended, or its timeout gave up on it (it may not give way: nothing
        waits on it). The orphan's run is then over, and before new work the next pass
        looks for another orphan; any other handler's end may free a held orphan."""
        if self._is_orphan(entry_id):
            self._orphan = None
            self._draining = True
            self._reclaim_now.set()
        else:
            self._wake_if_drained()

    def _wake_if_drained(self) -> None:
        """A held orphan may run now: the next reclaim pass, at once."""
        if self._draining and not self._busy():
            self._reclaim_now.set()

    async def _fetch_step(self) -> None:
        free = self.settings.concurrency - len(self._inflight)
        # Read when a quarter of the slots are free (or nothing runs): one XREADGROUP per
        # freed slot would cost a round trip per entry.
        if self._isolating or free <= 0 or (self._inflight and free < self._read_watermark):
            self._slot_free.clear()
            await self._slot_free.wait()
            return
        self._reading = True
        try:
            entries = await self.queue.read(
                self.consumer, min(free, self.settings.read_count), self.settings.block_ms
            )
        except ResponseError as e:
            await self._recreate_lost_group(e)
            return
        finally:
            self._reading = False
            self._wake_if_drained()  # a held orphan waited for this read
        await self._take(entries)

    async def _recreate_lost_group(self, e: ResponseError) -> None:
        """Redis lost the group (a restart without its data): make it again; other
        refusals propagate."""
        if "NOGROUP" not in str(e):
            raise e
        logger.warning("worker_group_missing")
        await self.queue.ensure_group()
        self._reclaim_now.set()

    async def _ack_step(self) -> None:
        await self._ack_ready.wait()
        # Let completions gather for a moment: one UPDATE and one XACK for many entries.
        # Only the acknowledgement waits; the work is done and measured already.
        if len(self._acks) < ACK_BATCH and not self._closing.is_set():
            await asyncio.sleep(ACK_LINGER_SECONDS)
        await finish_anyway(self._flush_acks(), "worker_ack_failed_after_cancel")

    async def _heartbeat_step(self) -> None:
        await self._pause(self.settings.heartbeat_interval, self._closing)
        await self.queue.renew(self.consumer, list(self._holding()))

    async def _reclaim_step(self) -> None:
        await self._pause(self.settings.reclaim_interval_seconds, self._reclaim_now)
        self._reclaim_now.clear()
        if self._stopping.is_set():
            return
        try:
            entries = await self.reclaim_once()
        except ResponseError as e:
            await self._recreate_lost_group(e)
            return
        await self._take(entries)

    @staticmethod
    async def _pause(seconds: float, until: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), seconds)

    # -- reclaiming --------------------------------------------------------------------

    async def reclaim_once(self) -> list[Entry]:
        """One orphan to run alone if there is one (nothing while other work still runs),
        else the parked retries that are due."""
        if self._orphan is not None:
            return []
        orphan = await self._next_orphan()
        if orphan is not None:
            self._orphan = orphan
            return [orphan]
        if self._isolating:
            return []
        s = self.settings
        budget = max(0, s.concurrency - len(self._inflight))
        if budget == 0:
            return []
        base_ms = int(s.retry_backoff_base_seconds * 500)  # the smallest jittered backoff
        claims: list[tuple[PendingInfo, int]] = []
        # The scan pages through the pending list (RECLAIM_SCAN_PAGES at most per pass):
        # one page from its start would let entries that are not due (long backoffs) hide
        # the due ones behind them for as long as they wait.
        parked = self._pending_pages("parked", base_ms, budget * 4, RETRY_PARKING_CONSUMER)
        async with contextlib.aclosing(parked):
            async for p in parked:
                due_ms = int(
                    1000
                    * retry_delay(
                        p.id,
                        p.deliveries,
                        s.retry_backoff_base_seconds,
                        s.retry_backoff_max_seconds,
                    )
                )
                if p.idle_ms >= due_ms:
                    claims.append((p, due_ms))
                    if len(claims) >= budget:
                        break
        return await self.queue.claim(self.consumer, claims[:budget])

    async def _next_orphan(self) -> Entry | None:
        """The orphan to run now, alone; None if there is none, or while other work still
        runs: the worker then holds the orphan (its claim renewed by the heartbeat, so no
        other worker drains for it too) and takes no new work until the last of what runs
        ends, and the pass after that runs it."""
        if self._held_orphan is None:
            self._held_orphan = await self._take_over_orphan()
            if self._held_orphan is None:
                self._draining = False
                self._slot_free.set()  # the fetch loop waits while orphans may remain
                return None
            metrics.ORPHANS.inc()
            logger.warning(
                "worker_orphan_taken",
                extra={
                    "entry_id": self._held_orphan.id,
                    "deliveries": self._held_orphan.deliveries,
                },
            )
        if self._busy():
            self._draining = True
            return None
        orphan = self._held_orphan
        self._draining = True  # no read may start while the mark is set
        # Failing (Redis down), it stays held; lost meanwhile, another worker runs it.
        held = await self.queue.mark_alone(self.consumer, orphan.id, orphan.deliveries)
        self._held_orphan = None
        if not held:
            self._reclaim_now.set()  # the next orphan, if any; else back to new work
            return None
        self._draining = False
        return orphan

    async def _take_over_orphan(self) -> Entry | None:
        """Claim one orphan: this consumer's own from before its restart first (one at a
        time, from where the last one was), then one of a worker gone silent."""
        if self._own_after is not None:
            own = await self.queue.read_own_pending(self.consumer, 1, after=self._own_after)
            if own:
                self._own_after = own[0].id
                return await self._with_alone_mark(own[0])
            self._own_after = None
        # Held by a worker that went silent -- or by this one, when its bookkeeping failed
        # or a claim renewal raced with parking: whatever this worker is not running or
        # acknowledging, it has abandoned. The scan pages (see RECLAIM_SCAN_PAGES): parked
        # retries with long backoffs are idle too and must not hide a dead worker's entries.
        held = self._holding()
        vt_ms = int(self.settings.visibility_timeout_seconds * 1000)
        found: PendingInfo | None = None
        silent = self._pending_pages("silent", vt_ms, len(held) + 16, None)
        async with contextlib.aclosing(silent):
            async for p in silent:
                if p.consumer != RETRY_PARKING_CONSUMER and p.id not in held:
                    found = p
                    self._scan_from["silent"] = p.id  # the next pass starts at it
                    break
        if found is None:
            return None
        taken = await self.queue.claim(self.consumer, [(found, vt_ms)])
        if not taken:
            self._reclaim_now.set()  # another worker took it first: look again at once
            return None
        return await self._with_alone_mark(taken[0])

    async def _with_alone_mark(self, orphan: Entry) -> Entry:
        mark = await self.queue.take_alone_mark(orphan.id, orphan.deliveries)
        return replace(orphan, killed_alone=mark)

    async def _pending_pages(
        self, scan: str, min_idle_ms: int, page: int, consumer: str | None
    ) -> AsyncGenerator[PendingInfo, None]:
        """The pending list a page at a time, from where this scan's last pass stopped, so
        that passes go round the whole list however long it is; back to the start at its
        end."""
        for _ in range(RECLAIM_SCAN_PAGES):
            rows = await self.queue.pending(
                min_idle_ms=min_idle_ms,
                count=page,
                consumer=consumer,
                start=self._scan_from.get(scan, "-"),
            )
            for p in rows:
                self._scan_from[scan] = "(" + p.id  # exclusive: after the last one seen
                yield p
            if len(rows) < page:
                self._scan_from[scan] = "-"
                return

    # -- running entries ---------------------------------------------------------------

    async def _take(self, entries: list[Entry]) -> None:
        for entry in entries:
            if entry.id in self._inflight:
                continue
            task = asyncio.create_task(self._guarded(entry), name=f"handler {entry.id}")
            self._inflight[entry.id] = task
            self._deliveries[entry.id] = entry.deliveries
            task.add_done_callback(functools.partial(self._done, entry.id))
        metrics.IN_FLIGHT.set(len(self._inflight))

    def _done(self, entry_id: str, _task: asyncio.Task[None]) -> None:
        # The in-flight gauge is set per batch (in _take), not per entry.
        self._inflight.pop(entry_id, None)
        self._deliveries.pop(entry_id, None)
        self._handler_over(entry_id)
        self._slot_free.set()

    async def _guarded(self, entry: Entry) -> None:
        """Bookkeeping that fails (Redis or Postgres down) leaves the entry pending: it is
        taken over after the visibility timeout. Log it; never lose the traceback."""
        try:
            await self._run_entry(entry)
            if self._is_orphan(entry.id):
                # Its run alone ended with an outcome: if its completion is never
                # recorded, the next takeover must not take it for the killer.
                await self.queue.clear_alone_marks([entry.id])
        except asyncio.CancelledError:
            raise
        except Exception:
            LOOP_ERRORS.labels("worker-task").inc()
            logger.exception("worker_entry_failed", extra={"entry_id": entry.id})

    async def _run_entry(self, entry: Entry) -> None:
        if entry.fields is None:
            # Deleted from the stream while pending: nothing to run. If it never completed,
            # the relay's reconciler publishes it again from Postgres.
            await self.queue.ack([entry.id])
            return
        try:
            envelope = Envelope.decode(entry.fields)
        except EnvelopeError as e:
            await self._dead_letter(entry, None, None, "undecodable", str(e), event_id=e.event_id)
            return
        route = self.router.get(envelope.type)
        if route is None:
            await self._dead_letter(
                entry, envelope, None, "unknown_type", f"no handler for {envelope.type!r}"
            )
            return
        token = request_id_var.set(envelope.request_id)
        try:
            await self._run_handler(entry, envelope, route)
        finally:
            request_id_var.reset(token)

    async def _run_handler(self, entry: Entry, envelope: Envelope, route: Route) -> None:
        s = self.settings
        ctx = TaskContext(
            envelope, entry.deliveries, entry.id, self.pool, self.handler_redis, self.state
        )
        timeout = route.timeout or s.task_timeout_seconds
        max_attempts = route.max_attempts or s.max_attempts
        if entry.killed_alone and entry.deliveries > min(max_attempts, s.max_crash_deliveries):
            # More deliveries than the crash bound (retries included; max_attempts if
            # lower), the last of them run alone with no outcome: it
            # took its worker down itself (a crash, the OOM killer, a blocked loop), which
            # the failure count below never sees. Running it again would take the next
            # worker down too. An orphan that has not yet run alone gets that run first:
            # it may have been only beside the entry that did it.
            await self._dead_letter(
                entry,
                envelope,
                route,
                "max_attempts",
                f"delivered {entry.deliveries} times without an outcome: the workers running"
                " it crashed or stalled",
            )
            return
        m = metrics.for_task(route.task_type)
        started = time.perf_counter()
        failure: Exception | None = None
        task = asyncio.current_task()
        assert task is not None
        timed_out = False
        if entry.deliveries >= max_attempts:
            self._last_attempts[entry.id] = functools.partial(
                self._dead_letter,
                entry,
                envelope,
                route,
                "max_attempts",
                f"timed out after {timeout}s and did not give way (the handler swallows its"
                " cancellation)",
            )
        self._watch(entry.id, task, started + timeout)
        returned = False
        try:
            await route.handler(ctx)
            returned = True
        except asyncio.CancelledError:
            if entry.id not in self._timed_out:
                raise
        except Exception as e:
            failure = e
        finally:
            del self._deadlines[entry.id]
            self._last_attempts.pop(entry.id, None)
            if entry.id in self._timed_out:
                # The sweeper's cancellation, however the handler ended: take it back. A
                # cancellation from elsewhere (the end of a shutdown's grace) still stands.
                # A handler that returned all the same, saying its work was done (an email
                # the server took, and its record: spend_cancellation()), is done, late;
                # one that returned without saying so may have stopped half way.
                self._timed_out.discard(entry.id)
                metrics.OVERDUE.set(len(self._timed_out))
                timed_out = not (returned and cancellation_spent(task))
                if task.uncancel() > 0:
                    raise asyncio.CancelledError
        ended = time.perf_counter()
        m.duration.observe(ended - started)
        if timed_out:
            error = f"timed out after {timeout}s"
        elif failure is None:
            m.end_to_end.observe(
                max(0.0, (datetime.now(UTC) - envelope.created_at).total_seconds())
            )
            m.done.inc()
            self._acks.append((entry.id, envelope.event_id))
            self._ack_ready.set()
            return
        elif isinstance(failure, PermanentError):
            await self._dead_letter(entry, envelope, route, "permanent_error", _describe(failure))
            return
        else:
            error = _describe(failure)
        if entry.deliveries >= max_attempts:
            await self._dead_letter(entry, envelope, route, "max_attempts", error)
            return
        await finish_anyway(
            self.queue.park_for_retry(self.consumer, [entry.id]), "worker_retry_failed_after_cancel"
        )
        m.retried.inc()
        logger.warning(
            "task_failed_will_retry",
            extra={
                "event_id": envelope.event_id,
                "task": route.task_type,
                "attempt": entry.deliveries,
                "error": error,
            },
        )

    # -- handler timeouts --------------------------------------------------------------
    # One sweeper for all running handlers instead of a timer each (asyncio.timeout per
    # task was about a fifth of the worker's CPU at thousands of tasks a second). It runs
    # while handlers run, and a timeout fires within TIMEOUT_SWEEP_SECONDS of its deadline.

    def _watch(self, entry_id: str, task: asyncio.Task[Any], deadline: float) -> None:
        self._deadlines[entry_id] = (deadline, task)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="worker-timeouts")

    async def _sweep(self) -> None:
        while self._deadlines:
            now = time.perf_counter()
            soonest = now + TIMEOUT_SWEEP_SECONDS
            for entry_id, (deadline, task) in list(self._deadlines.items()):
                if entry_id in self._timed_out:
                    continue  # cancelled already; its handler has yet to give way
                if deadline <= now:
                    self._timed_out.add(entry_id)
                    metrics.OVERDUE.set(len(self._timed_out))
                    # Only a cancellation spent after this one says the work is done.
                    forget_spent(task)
                    task.cancel()
                    self._handler_over(entry_id)
                else:
                    soonest = min(soonest, deadline)
            await asyncio.sleep(soonest - now)

    async def _dead_letter(
        self,
        entry: Entry,
        envelope: Envelope | None,
        route: Route | None,
        reason: str,
        error: str,
        *,
        event_id: str | None = None,
    ) -> None:
        """`event_id`: of an entry whose envelope could not be decoded beyond its id."""
        task_type = envelope.type if envelope else None
        event_id = envelope.event_id if envelope else event_id
        error = _storable(error)

        async def record() -> bool:
            # Only an entry this worker still holds. If it stalled past the visibility
            # timeout (a paused VM, a blocked loop), another worker took the entry over and
            # runs it; that one records its outcome, or the event would end with two dead
            # letters, replayed twice. The renewal checks the owner and resets the entry's
            # idle time, so no takeover comes before the script below checks it again.
            if not await self.queue.renew(self.consumer, [entry.id]):
                return False
            # Postgres first: the reconciler must not publish again an event given up on.
            marked = None
            if event_id is not None:
                marked = await self.bookkeeping.fetchval(
                    _MARK_DEAD, event_id, dead_letter_error(reason, error), entry.id
                )
            dead_id = await self.queue.dead_letter(
                entry,
                consumer=self.consumer,
                reason=reason,
                error=error,
                event_id=event_id,
                task_type=task_type,
            )
            if dead_id is None and marked is not None:
                # The mark took longer than the visibility timeout (a slow Postgres) and
                # the entry was taken over: left, it would say dead-lettered while the new
                # holder runs the event, and restore-lost would publish it a second time.
                await self.bookkeeping.execute(_UNMARK_DEAD, event_id, marked)
            return dead_id is not None

        if not await finish_anyway(record(), "worker_dead_letter_failed_after_cancel"):
            logger.warning(
                "task_outcome_left_to_new_holder",
                extra={"entry_id": entry.id, "event_id": event_id, "reason": reason},
            )
            return
        metrics.for_task(route.task_type if route else "unroutable").dead_lettered.inc()
        logger.error(
            "task_dead_lettered",
            extra={
                "entry_id": entry.id,
                "event_id": event_id,
                "task_type": task_type,
                "reason": reason,
                "error": error,
                "attempts": entry.deliveries,
            },
        )

    async def _flush_acks(self) -> None:
        """Record completion in Postgres, then XACK: never the other way round."""
        self._ack_ready.clear()
        if not self._acks:
            return
        batch, self._acks = self._acks, []
        ids = [sid for sid, _ in batch]
        self._flushing.update(ids)  # still held: renewed, and not taken for orphans
        try:
            event_ids = [eid for _, eid in batch if eid]
            if event_ids:
                await self.bookkeeping.execute(_MARK_COMPLETED, event_ids)
            await self.queue.ack(ids)
        except BaseException:
            self._acks[:0] = batch
            self._ack_ready.set()
            raise
        finally:
            self._flushing.difference_update(ids)
        self._wake_if_drained()


def _describe(e: BaseException) -> str:
    text = _storable(str(e))
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _storable(text: str) -> str:
    """Text Postgres, Redis and the JSON logs all take. An error's text can carry what a
    server sent: aiosmtplib decodes replies with surrogateescape, so a reply that is not
    UTF-8 becomes lone surrogates, which strict UTF-8 (asyncpg, redis-py, orjson) refuses;
    and Postgres refuses NUL. Unchanged, the dead letter could never be written and the
    entry would come back after every visibility timeout."""
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
