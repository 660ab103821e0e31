"""POST /v1/verify_email/resend: a new verification email for an unverified address.

A link lasts VERIFY_EMAIL_TTL_MINUTES; without this, a person who missed it could never
verify, nor sign up again (the address is taken). The answer is 202 whatever the address
(unknown, verified, or asked for too recently), so that it does not tell who signed up.
"""

from __future__ import annotations

import logging
import uuid

import orjson
from aiohttp import web

from api_service.bodies import read_body
from api_service.context import APP_KEY
from api_service.metrics import RESENDS
from api_service.models import ResendRequest
from api_service.request_id import REQUEST_ID_KEY
from shared.constants import NOTIFY_CHANNEL, TASK_SEND_VERIFY_EMAIL

logger = logging.getLogger(__name__)

# One statement, so one transaction: the request time moves and the outbox row is written
# together, or neither. The address is matched as the unique index stores it (lower()).
_RESEND = """
WITH target AS (
    UPDATE users SET verify_requested_at = now()
    WHERE lower(email) = lower($1) AND NOT is_email_verified
      AND verify_requested_at <= now() - make_interval(secs => $2)
    RETURNING username
), event AS (
    INSERT INTO outbox (event_id, task_type, queue, payload, headers)
    SELECT $3, $4, $5, jsonb_build_object('username', target.username), $6 FROM target
    RETURNING id
)
SELECT target.username, pg_notify($7, '') FROM target, event
"""

ACCEPTED = orjson.dumps(
    {"detail": "If an unverified account uses this address, a new link is on its way."}
)


async def resend_verify_email(request: web.Request) -> web.Response:
    ctx = request.app[APP_KEY]
    body = await read_body(request, ResendRequest)
    event_id = uuid.uuid4()
    row = await ctx.pool.fetchrow(
        _RESEND,
        str(body.email),
        ctx.settings.resend_interval_seconds,
        event_id,
        TASK_SEND_VERIFY_EMAIL,
        ctx.settings.queue,
        {"request_id": request[REQUEST_ID_KEY]},
        NOTIFY_CHANNEL,
    )
    RESENDS.inc()
    if row is not None:
        logger.info(
            "verify_email_resend", extra={"username": row["username"], "event_id": str(event_id)}
        )
    return web.Response(status=202, body=ACCEPTED, content_type="application/json")
