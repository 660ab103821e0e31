"""What every `python -m <service>` does before and around its own serve()."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

from pydantic_settings import BaseSettings

from shared import logs, settings
from shared.errors import ConfigError

S = TypeVar("S", bound=BaseSettings)


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
        asyncio.run(main())
    except ConfigError as e:  # raised while starting, e.g. by an app's startup hook
        config_error(service, e)
