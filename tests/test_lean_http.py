"""The benchmark's lean HTTP client reads what the API answers, times all of it, and counts
what it cannot read as no answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from bench.lean_http import NO_ANSWER, Answer, LeanClient, interleaved
from devstack.procs import free_port

SLOW = 0.05  # seconds /slow waits before it writes the last part of its answer


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """An aiohttp server and a log of the bodies it read. /echo answers with the body
    reversed (422 if empty); /slow sends its headers, then its body SLOW seconds later;
    /chunked answers without a Content-Length; /drop closes the connection unanswered;
    /close answers with Connection: close."""
    seen: list[bytes] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(body)
        return web.Response(status=201 if body else 422, body=body[::-1])

    async def slow(request: web.Request) -> web.StreamResponse:
        seen.append(await request.read())
        resp = web.StreamResponse(status=201)
        resp.content_length = 2
        await resp.prepare(request)
        await resp.write(b"o")
        await asyncio.sleep(SLOW)
        await resp.write(b"k")
        await resp.write_eof()
        return resp

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"x")
        await resp.write_eof()
        return resp

    async def drop(request: web.Request) -> web.Response:
        seen.append(await request.read())
        assert request.transport is not None
        request.transport.close()
        return web.Response(status=201)

    async def close(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.Response(status=201, body=b"bye", headers={"Connection": "close"})

    app = web.Application()
    for path, handler in (
        ("/echo", echo),
        ("/slow", slow),
        ("/chunked", chunked),
        ("/drop", drop),
        ("/close", close),
    ):
        app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield port, seen
    finally:
        await runner.cleanup()


async def test_requests_on_one_connection_each_read_to_its_end(
    server: tuple[int, list[bytes]],
) -> None:
    port, seen = server

    def three() -> list[Answer]:
        with LeanClient(port) as client:
            return [client.post_json("/echo", b) for b in (b"a" * 70_000 + b"z", b"", b"bc")]

    # A 70 kB answer spans several reads; the next answer is read from where it ends.
    answers = await asyncio.to_thread(three)
    assert [a.status for a in answers] == [201, 422, 201]
    assert [a.body for a in answers] == [b"z" + b"a" * 70_000, b"", b"cb"]
    assert seen == [b"a" * 70_000 + b"z", b"", b"bc"]


async def test_the_clock_runs_to_the_answers_last_byte(server: tuple[int, list[bytes]]) -> None:
    port, _ = server

    def timed() -> tuple[float, float, Answer, float, float]:
        with LeanClient(port) as client:
            client.post_json("/echo", b"warm")
            before, tick = time.time(), time.perf_counter()
            answer = client.post_json("/slow", b"x")
            return before, tick, answer, time.perf_counter(), time.time()

    before, tick, answer, tock, after = await asyncio.to_thread(timed)
    assert answer.status == 201
    assert SLOW <= answer.seconds <= after - before
    assert before + SLOW <= answer.arrived <= after
    # The send's time is on time.perf_counter()'s clock, the one a server's marks use.
    assert tick <= answer.sent and answer.sent + answer.seconds <= tock


async def test_interleaved_sends_chunks_to_each_target_in_turn_with_the_spacing(
    server: tuple[int, list[bytes]],
) -> None:
    port, seen = server
    started = time.perf_counter()
    first, second = await asyncio.to_thread(
        interleaved, "/echo", [(port, [b"a1", b"a2", b"a3"]), (port, [b"b1", b"b2"])], 2, 0.02
    )
    assert time.perf_counter() - started >= 5 * 0.02
    assert seen == [b"a1", b"a2", b"b1", b"b2", b"a3"]
    assert [a.status for a in first] == [201, 201, 201]
    assert [a.status for a in second] == [201, 201]
    with pytest.raises(ValueError, match="chunk"):
        interleaved("/echo", [(port, [b"x"])], 0)


async def test_what_cannot_be_read_is_no_answer_and_the_next_request_reconnects(
    server: tuple[int, list[bytes]],
) -> None:
    port, seen = server

    def run() -> list[int]:
        with LeanClient(port) as client:
            return [
                client.post_json("/chunked", b"x").status,  # no Content-Length
                client.post_json("/echo", b"after-chunked").status,
                client.post_json("/drop", b"dropped").status,
                client.post_json("/echo", b"after-drop").status,
                client.post_json("/close", b"closing").status,
                client.post_json("/echo", b"after-close").status,
            ]

    assert await asyncio.to_thread(run) == [NO_ANSWER, 201, NO_ANSWER, 201, 201, 201]
    assert seen[-5:] == [b"after-chunked", b"dropped", b"after-drop", b"closing", b"after-close"]


def test_a_refused_connection_is_no_answer() -> None:
    port = free_port()  # nothing listens there
    (answers,) = interleaved("/echo", [(port, [b"a", b"b"])], 1)
    assert [a.status for a in answers] == [NO_ANSWER, NO_ANSWER]
