"""A worker app for the fault tests: the real verification handler, except that it hangs
on the first attempt for users whose name starts with "hang", kills its process (as
the OOM killer would: no cleanup) for users whose name starts with "crash", and for users
whose name starts with "deaf" never ends, swallowing every cancellation (a handler bug)."""

from __future__ import annotations

import asyncio
import os

from shared.constants import TASK_SEND_VERIFY_EMAIL
from worker_service import app as verify_app
from worker_service.router import Router, TaskContext

router = Router(
    startup_hooks=list(verify_app.router.startup_hooks),
    shutdown_hooks=list(verify_app.router.shutdown_hooks),
)


@router.handler(TASK_SEND_VERIFY_EMAIL, timeout=1.0)
async def hang_then_send(ctx: TaskContext) -> None:
    username = str(ctx.payload.get("username", ""))
    if username.startswith("hang") and ctx.attempt == 1:
        await asyncio.Event().wait()  # never set: only the timeout ends this
    if username.startswith("deaf"):
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                continue  # the bug: a cancellation swallowed
    if username.startswith("crash"):
        os._exit(70)
    await verify_app.send_verify_email(ctx)
