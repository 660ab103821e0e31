"""The benchmark's lean HTTP client reads what the API answers, and refuses what it can't."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from bench.lean_http import LeanClient, LeanHTTPError, interleaved
from devstack.procs import free_port


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """An aiohttp server that answers each POST with its body reversed, and a log of the
    bodies it read; /chunked answers without a Content-Length."""
    seen: list[bytes] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(body)
        return web.Response(status=201 if body else 422, body=body[::-1])

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"x")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_post("/chunked", chunked)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port, seen
    await runner.cleanup()


async def test_requests_on_one_connection_each_read_to_its_end(
    server: tuple[int, list[bytes]],
) -> None:
    port, seen = server

    def three() -> list[int]:
        with LeanClient(port) as client:
            return [client.post_json("/echo", b).status for b in (b"a" * 70_000, b"", b"bc")]

    # A 70 kB answer spans several reads; the next answer is read from where it ends.
    assert await asyncio.to_thread(three) == [201, 422, 201]
    assert seen == [b"a" * 70_000, b"", b"bc"]


async def test_interleaved_sends_chunks_to_each_target_in_turn(
    server: tuple[int, list[bytes]],
) -> None:
    port, seen = server
    first, second = await asyncio.to_thread(
        interleaved, "/echo", [(port, [b"a1", b"a2", b"a3"]), (port, [b"b1", b"b2"])], 2
    )
    assert seen == [b"a1", b"a2", b"b1", b"b2", b"a3"]
    assert [a.status for a in first] == [201, 201, 201]
    assert len(second) == 2
    assert all(a.seconds > 0 for a in first + second)


async def test_an_answer_without_content_length_is_refused(
    server: tuple[int, list[bytes]],
) -> None:
    port, _ = server

    def post() -> None:
        with LeanClient(port) as client:
            client.post_json("/chunked", b"x")

    with pytest.raises(LeanHTTPError, match="without Content-Length"):
        await asyncio.to_thread(post)
