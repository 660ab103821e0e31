"""The API's Prometheus metrics and the middleware that records them."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import Counter, Histogram

from api_service.problems import Handler

REQUESTS = Counter(
    "api_http_requests", "HTTP requests by route, method and status.", ["route", "method", "status"]
)
LATENCY = Histogram(
    "api_http_request_duration_seconds",
    "HTTP request latency by route and method.",
    ["route", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SIGNUPS = Counter("api_signups", "Users created (the outbox row committed with them).")
# No outcome label: /metrics is served on the API's port, and a counter of queued resends
# read before and after a request would tell whether the address is registered. The log
# line `verify_email_resend` records each one queued.
RESENDS = Counter(
    "api_verify_email_resends",
    "Requests for a new verification email (queued or not, which the answer never says).",
)


def _route(request: web.Request) -> str:
    # The route template, never the raw path: label values stay bounded.
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        route = _route(request)
        method = request.method if request.method in _METHODS else "OTHER"
        REQUESTS.labels(route, method, str(status)).inc()
        LATENCY.labels(route, method).observe(time.perf_counter() - started)


_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
