"""Worker apps for the benchmark (no SMTP): `--app bench.apps:router`.

- "incr": one Redis INCR, the worker-drain stage's task.
- "send_verify_email" (the task the API enqueues): records commit->handler latency, i.e.
  `now - envelope.created_at` in seconds, with `now`, the username and the time of the
  XADD (from the stream id), into a Redis list, for the end-to-end stage.
"""

from __future__ import annotations

import time

from shared.constants import TASK_SEND_VERIFY_EMAIL
from worker_service.router import Router, TaskContext

COUNTER_KEY = "bench:incr"
LATENCY_KEY = "bench:e2e"

router = Router()


@router.handler("incr")
async def incr(ctx: TaskContext) -> None:
    await ctx.redis.incr(COUNTER_KEY)


@router.handler(TASK_SEND_VERIFY_EMAIL)
async def record_latency(ctx: TaskContext) -> None:
    now = time.time()
    latency = now - ctx.envelope.created_at.timestamp()
    user = ctx.payload.get("username", "")
    # The stream id's first part is when Redis took the relay's XADD (ms, same clock).
    xadd = int(ctx.stream_id.split("-", 1)[0]) / 1000
    await ctx.redis.rpush(LATENCY_KEY, f"{latency:.6f} {now:.6f} {user} {xadd:.3f}")
