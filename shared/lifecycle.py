"""A uniform lifecycle for long-running loops, and the main() that runs a service.

Every loop is an object with `start()`, `stop()` (idempotent and safe before start) and a
`run_once()` that tests call directly. A failing iteration is logged with its traceback,
counted, and followed by a jittered backoff; cancellation is a clean exit.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import random
import signal
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from prometheus_client import Counter

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOOP_ERRORS = Counter("loop_errors_total", "Iterations of a background loop that raised.", ["loop"])


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff for the n-th consecutive failure (n >= 1), each delay drawn
    between half and all of its step."""
    exp = min(cap, base * (2 ** min(attempt - 1, 32)))
    return random.uniform(exp / 2, exp)


async def finish_anyway(aw: Coroutine[Any, Any, T], failed_late: str) -> T:
    """Await `aw` in a task that the caller's cancellation does not stop (asyncio.shield):
    a write begun is finished. If the caller is cancelled first and the write then fails,
    the failure is logged as `failed_late`; asyncio would report it only as a task
    exception never retrieved, with no event name to alert on."""
    task = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(functools.partial(_log_late_failure, failed_late))
        raise


# A stop gives a task inside finish_uncut() this much more time once its grace is over
# and it has been cancelled (worker_service.consumer): an email the SMTP server may have
# taken is recorded, rather than sent again by the next worker.
FINISH_UNCUT_SECONDS = 5.0
_uncut: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


_spent: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


def finishing_uncut(task: asyncio.Task[Any]) -> bool:
    """`task` is inside finish_uncut(): its cancellation waits for the step's end."""
    return task in _uncut


def spend_cancellation() -> None:
    """The running task caught a cancellation and returns all the same because its work
    is done (an email sent and recorded): it says so here, and its worker counts the run a
    success although its timeout fired. A handler that returns after a cancellation
    without saying so is taken as timed out, since it may have stopped half way."""
    task = asyncio.current_task()
    if task is not None:
        _spent.add(task)


def cancellation_spent(task: asyncio.Task[Any]) -> bool:
    return task in _spent


def forget_spent(task: asyncio.Task[Any]) -> None:
    """Before cancelling `task`: a cancellation it spent before (an asyncio.timeout() of
    its own during a send) says nothing about this one."""
    _spent.discard(task)


async def finish_uncut(aw: Coroutine[Any, Any, T]) -> tuple[T, bool]:
    """Run `aw` to its end even if the caller is cancelled meanwhile: a step that must not
    be cut in the middle (an email the SMTP server may have taken is recorded before
    anything else happens). The cancellation waits for as long as `aw` takes: bound it.

    Returns `aw`'s result and whether a cancellation came meanwhile. One that came is
    spent once `aw` has succeeded, since the work it would have stopped is done: the
    caller ends without waiting on anything more (the mailer skips QUIT) and returns. If
    `aw` failed, CancelledError is raised from its failure.
    """
    me = asyncio.current_task()
    task = asyncio.ensure_future(aw)
    cancelled = False
    if me is not None:
        _uncut.add(me)
    try:
        while not task.done():
            try:
                await asyncio.wait([task])  # unlike awaiting it, a cancellation here spares it
            except asyncio.CancelledError:
                cancelled = True
    finally:
        if me is not None:
            _uncut.discard(me)
    if cancelled and (task.cancelled() or task.exception() is not None):
        raise asyncio.CancelledError() from (None if task.cancelled() else task.exception())
    if cancelled:
        spend_cancellation()
    return task.result(), cancelled


def _log_late_failure(event: str, task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.error(event, exc_info=error)


def cancel_requested() -> bool:
    """The running task has been cancelled, though what it awaited did not raise the
    CancelledError: redis-py can turn a cancellation in the middle of a command into a
    ConnectionError, and its retry may then run the command again and return. A loop that
    went round again would never end, and whoever cancelled it (a stop past its grace,
    asyncio.run() at exit) would wait on it for ever."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self, grace: float = ...) -> None: ...


class Loop(abc.ABC):
    """A background loop that calls run_once() until stopped.

    run_once() returns True when it did work and should be called again at once; False
    means idle, and the loop waits for `wake()` or `idle_interval`.
    """

    name = "loop"
    idle_interval: float = 1.0
    error_backoff_base: float = 0.1
    error_backoff_cap: float = 10.0

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._working = False
        self.failures = 0

    @abc.abstractmethod
    async def run_once(self) -> bool:
        """Do one unit of work; True if there may be more right away."""

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def idle(self) -> bool:
        """Waiting for a wake-up: neither inside run_once nor backing off after a failure."""
        return self.running and not self._working and self.failures == 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self, grace: float = 10.0) -> None:
        """Let the current iteration finish within `grace` seconds, then cancel it."""
        self._stopping.set()
        self._wakeup.set()
        task, self._task = self._task, None
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
        except TimeoutError:
            logger.warning("loop_stop_timeout", extra={"loop": self.name, "grace": grace})
            task.cancel()
            # Its cleanup may wait on a server that went silent (asyncpg's ROLLBACK as a
            # transaction unwinds, up to the 30 s command timeout): not for longer than
            # the floor. Closing the pool ends such a wait; the entrypoint ends what is left.
            _done, late = await asyncio.wait([task], timeout=STOP_FLOOR_SECONDS)
            if late:
                logger.warning("loop_left_stopping", extra={"loop": self.name})

    async def _sleep(self, seconds: float, wakeable: bool = True) -> None:
        """Sleep, cut short by stop(), and by wake() if `wakeable`."""
        if seconds <= 0:
            return
        event = self._wakeup if wakeable else self._stopping
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
        self._wakeup.clear()

    async def _run(self) -> None:
        logger.info("loop_started", extra={"loop": self.name})
        while not self._stopping.is_set() and not cancel_requested():
            self._working = True
            try:
                busy: bool | None = await self.run_once()
                self.failures = 0
            except asyncio.CancelledError:
                break
            except Exception:
                if cancel_requested():
                    break
                busy = None
                self.failures += 1
                LOOP_ERRORS.labels(self.name).inc()
                logger.exception(
                    "loop_iteration_failed", extra={"loop": self.name, "failures": self.failures}
                )
            finally:
                self._working = False
            if busy is None:
                # Not cut short by wake(): while Redis is down every signup still NOTIFYs.
                await self._sleep(
                    backoff_delay(self.failures, self.error_backoff_base, self.error_backoff_cap),
                    wakeable=False,
                )
            elif not busy:
                await self._sleep(self.idle_interval)
        logger.info("loop_stopped", extra={"loop": self.name})


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT only set the event; main() does the stopping."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


STOP_FLOOR_SECONDS = 0.5


async def stop_within(services: Sequence[Service], grace: float) -> None:
    """Stop the services in order, all of them within one `grace`: each gets what the ones
    before it left, and at least STOP_FLOOR_SECONDS to close its connections. Each its own
    full grace would add up past the orchestrator's stop period (compose's is 15 s against
    10 s of grace), and the process would be SIGKILLed."""
    deadline = time.monotonic() + grace
    for svc in services:
        try:
            await svc.stop(max(STOP_FLOOR_SECONDS, deadline - time.monotonic()))
        except Exception:
            logger.exception("service_stop_failed", extra={"component": svc.name})


async def run_until_signalled(
    services: Sequence[Service],
    grace: float,
    cleanup: Callable[[float], Awaitable[None]] | None = None,
) -> None:
    """Start the services, wait for SIGTERM/SIGINT, stop them in reverse order within grace;
    then `cleanup(seconds)`, given what is left of the grace (at least STOP_FLOOR_SECONDS)."""
    stop = asyncio.Event()
    install_signal_handlers(stop)
    started: list[Service] = []
    try:
        for svc in services:
            await svc.start()
            started.append(svc)
        logger.info("service_started")
        await stop.wait()
        logger.info("service_stopping", extra={"grace": grace})
    finally:
        deadline = time.monotonic() + grace
        await stop_within(list(reversed(started)), grace)
        if cleanup is not None:
            await cleanup(max(STOP_FLOOR_SECONDS, deadline - time.monotonic()))
    logger.info("service_stopped")
