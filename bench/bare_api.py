"""`python -m bench.bare_api`: the floor under the API's overhead, for stage 3's baseline.

The least a server can do for a signup on this stack: aiohttp on uvloop reads the body,
argon2-cffi hashes the password on a thread pool (with the API's parameters, from the
same environment variables), and the API's own signup statement runs through a pool made
as the API makes it; the 201 carries the row. No validation, middleware, request id,
metrics or logging. The events it enqueues are the API's task, so the relay and the
worker do the same work for them as for the API's.

`POST /v1/users/timed` does the same and adds to its answer where the signup's time went:
`marks_ns`, the `time.perf_counter_ns()` of each hand-over (see bench.timeline).

Environment: DATABASE_URL, API_PORT, ARGON2_TIME_COST, ARGON2_MEMORY_KIB.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import orjson
import uvloop
from aiohttp import web
from argon2 import PasswordHasher
from argon2.low_level import Type

from api_service.users import _SIGNUP as SIGNUP_STATEMENT
from shared.connections import create_pool
from shared.constants import DEFAULT_QUEUE, NOTIFY_CHANNEL, TASK_SEND_VERIFY_EMAIL
from shared.settings import usable_cpus


async def serve() -> None:
    hasher = PasswordHasher(
        time_cost=int(os.environ["ARGON2_TIME_COST"]),
        memory_cost=int(os.environ["ARGON2_MEMORY_KIB"]),
        parallelism=1,
        type=Type.ID,
    )
    threads = ThreadPoolExecutor(usable_cpus())
    db = await create_pool(os.environ["DATABASE_URL"])

    async def insert(doc: dict[str, str], hashed: str) -> dict[str, object]:
        row = await db.fetchrow(
            SIGNUP_STATEMENT,
            doc["username"],
            doc["full_name"],
            doc["email"],
            hashed,
            uuid.uuid4(),
            TASK_SEND_VERIFY_EMAIL,
            DEFAULT_QUEUE,
            {"username": doc["username"]},
            {},
            NOTIFY_CHANNEL,
        )
        assert row is not None
        return dict(row)

    async def signup(request: web.Request) -> web.Response:
        doc = orjson.loads(await request.read())
        hashed = await asyncio.wrap_future(threads.submit(hasher.hash, doc["password"]))
        row = await insert(doc, hashed)
        return web.Response(status=201, body=orjson.dumps(row), content_type="application/json")

    def hash_marked(password: str, marks: list[int]) -> str:
        marks.append(time.perf_counter_ns())
        hashed = hasher.hash(password)
        marks.append(time.perf_counter_ns())
        return hashed

    async def timed_signup(request: web.Request) -> web.Response:
        marks = [time.perf_counter_ns()]  # the handler starts: aiohttp has read the head
        doc = orjson.loads(await request.read())
        marks.append(time.perf_counter_ns())
        future = threads.submit(hash_marked, doc["password"], marks)  # two marks, in the thread
        hashed = await asyncio.wrap_future(future)
        marks.append(time.perf_counter_ns())
        row = await insert(doc, hashed)
        marks.append(time.perf_counter_ns())
        body = orjson.dumps(row | {"marks_ns": marks})
        return web.Response(status=201, body=body, content_type="application/json")

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/users", signup)
    app.router.add_post("/v1/users/timed", timed_signup)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(os.environ["API_PORT"])).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await db.close()
        threads.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    uvloop.run(serve())
