"""What every `python -m <service>` does before and around its own serve()."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

from pydantic_settings import BaseSettings

from shared import logs, settings
from shared.errors import ConfigError

S = TypeVar("S", bound=BaseSettings)

logger = logging.getLogger(__name__)

# After main() returns, how long the tasks still running get to end once cancelled.
LEFTOVER_TASKS_SECONDS = 2.0


def config_error(service: str, message: object) -> NoReturn:
    """One line on stderr, exit code 2: a deployment mistake, not a crash."""
    print(f"{service}: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_settings(service: str, cls: type[S]) -> S:
    try:
        return settings.load(cls)
    except ConfigError as e:
        config_error(service, e)


def run(service: str, log_level: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """JSON logs, uvloop where available, then main() until it returns."""
    logs.setup(service, log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(_then_leftovers(main))
    except ConfigError as e:  # raised while starting, e.g. by an app's startup hook
        config_error(service, e)


async def _then_leftovers(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """main(), then the tasks it left running, cancelled and given LEFTOVER_TASKS_SECONDS.
    asyncio.run() would wait for ever on one that swallows its cancellation (a task
    handler's bug), and the orchestrator would SIGKILL the process after its stop period:
    such a process exits 1 instead, naming the tasks."""
    try:
        await main()
    finally:
        await _end_leftovers()


async def _end_leftovers() -> None:
    leftovers = asyncio.all_tasks() - {asyncio.current_task()}
    if not leftovers:
        return
    for task in leftovers:
        task.cancel()
    _done, deaf = await asyncio.wait(leftovers, timeout=LEFTOVER_TASKS_SECONDS)
    if deaf:
        logger.error(
            "tasks_ignore_cancellation", extra={"tasks": sorted(t.get_name() for t in deaf)}
        )
        logging.shutdown()
        os._exit(1)
