"""X-Request-ID: taken from the client when sane, generated otherwise, echoed back."""

from __future__ import annotations

import re
import uuid

from aiohttp import web

from api_service.problems import Handler
from shared.logs import request_id_var

HEADER = "X-Request-ID"
_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
REQUEST_ID_KEY = web.RequestKey("request_id", str)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get(HEADER, "")
    rid = given if _SANE.match(given) else uuid.uuid4().hex
    request[REQUEST_ID_KEY] = rid
    token = request_id_var.set(rid)
    try:
        response = await handler(request)
    except web.HTTPException as e:
        e.headers[HEADER] = rid
        raise
    finally:
        request_id_var.reset(token)
    response.headers[HEADER] = rid
    return response
