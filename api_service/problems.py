"""RFC 9457 problem responses, and the middleware that turns every error into one."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"

# Stable `type` URIs (relative references, resolved against the API's base URL).
BAD_JSON = "/problems/malformed-json"
BAD_BODY = "/problems/malformed-body"
UNSUPPORTED_MEDIA = "/problems/unsupported-media-type"
TOO_LARGE = "/problems/request-too-large"
VALIDATION = "/problems/validation-error"
USERNAME_TAKEN = "/problems/username-taken"
EMAIL_TAKEN = "/problems/email-taken"
INVALID_CODE = "/problems/invalid-verification-code"
CODE_EXPIRED = "/problems/verification-code-expired"
CODE_USED = "/problems/verification-code-used"
NOT_FOUND = "/problems/not-found"
METHOD_NOT_ALLOWED = "/problems/method-not-allowed"
UNAVAILABLE = "/problems/service-unavailable"
OVERLOADED = "/problems/overloaded"
INTERNAL = "/problems/internal-error"
HTTP_ERROR = "about:blank"


class ProblemError(Exception):
    """Raise from a handler to answer with a problem document."""

    def __init__(
        self,
        status: int,
        type_: str,
        title: str,
        detail: str | None = None,
        *,
        invalid_params: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(title)
        self.status, self.type, self.title, self.detail = status, type_, title, detail
        self.invalid_params = invalid_params
        self.headers = headers

    def response(self, instance: str | None = None) -> web.Response:
        doc: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status}
        if self.detail:
            doc["detail"] = self.detail
        if instance:
            doc["instance"] = instance
        if self.invalid_params is not None:
            doc["invalid-params"] = self.invalid_params
        return web.Response(
            status=self.status,
            body=orjson.dumps(doc),
            content_type=PROBLEM_CONTENT_TYPE,
            headers=self.headers,
        )


def validation_problem(e: ValidationError) -> ProblemError:
    """422 naming each invalid field and why; the offending values are never echoed."""
    params = []
    for err in e.errors(include_url=False, include_input=False):
        name = ".".join(str(p) for p in err["loc"]) or "body"
        reason = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        params.append({"name": name, "reason": reason})
    return ProblemError(
        422, VALIDATION, "Invalid request", "One or more fields are invalid.", invalid_params=params
    )


_HTTP_TYPES = {
    404: (NOT_FOUND, "Not found"),
    405: (METHOD_NOT_ALLOWED, "Method not allowed"),
    413: (TOO_LARGE, "Request body too large"),
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProblemError as e:
        return e.response(request.path)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        type_, title = _HTTP_TYPES.get(e.status, (HTTP_ERROR, e.reason))
        resp = ProblemError(e.status, type_, title).response(request.path)
        if e.status == 405 and "Allow" in e.headers:
            resp.headers["Allow"] = e.headers["Allow"]
        return resp
    except Exception:
        # The trace goes to the log only; the client gets a stable, empty-of-detail problem.
        logger.exception("request_failed", extra={"path": request.path})
        return ProblemError(500, INTERNAL, "Internal error").response(request.path)
