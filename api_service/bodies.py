"""Request bodies: JSON read within the size limit, then validated by a model."""

from __future__ import annotations

import json
from typing import TypeVar

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, ValidationError

from api_service import problems
from api_service.problems import ProblemError

M = TypeVar("M", bound=BaseModel)


async def read_body(request: web.Request, model: type[M]) -> M:
    """The body validated by `model`, or the problem that says why not (415, 413, 400,
    422 naming each invalid field)."""
    doc = await read_json(request)
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise problems.validation_problem(e) from None


async def read_json(request: web.Request) -> object:
    """The body as JSON, or the problem that says why not (415, 413, 400)."""
    if request.content_type != "application/json":
        raise ProblemError(
            415,
            problems.UNSUPPORTED_MEDIA,
            "Unsupported media type",
            "Send the body as application/json.",
        )
    try:
        body = await request.read()  # bounded by the application's client_max_size (413)
    except (RequestPayloadError, ConnectionResetError) as e:
        # A Content-Encoding the body does not match (RequestPayloadError), or a client
        # gone before the end of its body (ConnectionResetError: nobody reads this answer;
        # it is counted as a 400, not as a 500 for the error-rate alert).
        raise ProblemError(
            400, problems.BAD_BODY, "Malformed body", "The request body could not be read."
        ) from e
    # The standard parser, not orjson (a few microseconds more on a body this size): orjson
    # keeps the last of two members with one name, and a proxy or firewall in front that
    # keeps the first would have checked another signup than the one made here. Integers
    # beyond 64 bits, which orjson refuses, are parsed too: a 422 on their field.
    try:
        return json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_unique_names,
            parse_constant=_refuse_constant,
        )
    except (ValueError, RecursionError) as e:
        raise ProblemError(400, problems.BAD_JSON, "Malformed JSON", str(e)[:200]) from None


def _unique_names(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"the name {name!r} appears twice in one object")
            seen.add(name)
    return obj


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")
