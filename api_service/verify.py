"""GET /v1/verify_email: the link in the email. JSON for API clients, a page for people."""

from __future__ import annotations

import hmac
import logging
from html import escape

import orjson
from aiohttp import web
from pydantic import ValidationError

from api_service import problems
from api_service.context import APP_KEY
from api_service.models import VerifyEmailQuery
from api_service.problems import ProblemError
from shared.verification import hash_code

logger = logging.getLogger(__name__)

# Locked: a link used or ended by a newer email between this read and the UPDATE below
# would otherwise be answered "already used" for an address that is not verified.
_LOOKUP = """
SELECT id, username, email, secret_code_hash, used_at, sent_at, expires_at < now() AS expired
FROM verify_emails WHERE id = $1
FOR UPDATE
"""
_USE = """
UPDATE verify_emails SET used_at = now()
WHERE id = $1 AND used_at IS NULL AND expires_at >= now()
RETURNING username, email
"""
_VERIFY_USER = "UPDATE users SET is_email_verified = true WHERE username = $1"


def wants_html(request: web.Request) -> bool:
    """A browser asks for text/html first; API clients ask for JSON or anything."""
    accept = request.headers.get("Accept", "")
    html = accept.find("text/html")
    json = accept.find("application/json")
    return html != -1 and (json == -1 or html < json)


async def verify_email(request: web.Request) -> web.Response:
    html = wants_html(request)
    try:
        try:
            query = VerifyEmailQuery.model_validate(dict(request.query))
        except ValidationError as e:
            raise problems.validation_problem(e) from None
        await _verify(request, query)
    except ProblemError as e:
        if html:
            return _page(e.status, "This link does not work", _advice(e))
        raise
    if html:
        return _page(200, "Email verified", "Your email address is confirmed. You can sign in.")
    return web.Response(body=orjson.dumps({"is_verified": True}), content_type="application/json")


async def _verify(request: web.Request, query: VerifyEmailQuery) -> None:
    ctx = request.app[APP_KEY]
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_LOOKUP, query.email_id)
        if row is None or not hmac.compare_digest(
            bytes(row["secret_code_hash"]), hash_code(query.secret_code)
        ):
            raise ProblemError(
                400,
                problems.INVALID_CODE,
                "Invalid verification link",
                "The link is not valid. Use the link from your most recent email.",
            )
        if row["used_at"] is not None:
            raise ProblemError(
                409, problems.CODE_USED, "Link already used", "This email is verified already."
            )
        if row["expired"]:
            raise ProblemError(
                410,
                problems.CODE_EXPIRED,
                "Link expired",
                "The link has expired. Ask for a new one: POST the address to"
                " /v1/verify_email/resend.",
            )
        used = await conn.fetchrow(_USE, query.email_id)
        if used is None:  # used or expired between the two statements
            raise ProblemError(409, problems.CODE_USED, "Link already used")
        await conn.execute(_VERIFY_USER, used["username"])
    logger.info("email_verified", extra={"username": used["username"], "email_id": query.email_id})


def _advice(e: ProblemError) -> str:
    return {
        problems.CODE_USED: "This link was used already, so your address is probably verified.",
        problems.CODE_EXPIRED: "The link has expired. Ask for a new email where you signed up.",
    }.get(e.type, "The link is incomplete or not valid. Open the link from your latest email.")


def _page(status: int, title: str, message: str) -> web.Response:
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;"
        "padding:0 1rem;line-height:1.5}</style></head>"
        f'<body><h1>{escape(title)}</h1><p id="message">{escape(message)}</p></body></html>'
    )
    return web.Response(status=status, text=body, content_type="text/html", charset="utf-8")
