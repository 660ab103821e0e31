"""What the handlers share, kept on the application (no module-level pools)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web

from api_service.passwords import Hasher
from api_service.settings import ApiSettings


@dataclass
class ApiContext:
    settings: ApiSettings
    pool: asyncpg.Pool[Any]
    hasher: Hasher


APP_KEY = web.AppKey("ctx", ApiContext)
