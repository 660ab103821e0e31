"""A lean HTTP/1.1 client for latency figures: one blocking keep-alive socket, no event loop.

aiohttp's client costs about 0.2 ms of its own per request on this machine (a handler
that only answers 201: 0.34 ms through it, 0.16 ms through this client, measured
2026-11-29), which a figure of the API's own overhead should not count. This client sends
one request, reads the answer to its last byte and stops the clock: what it adds is a
send() and the recv()s that wake it. Run it in a thread (`asyncio.to_thread`).

It speaks only what the API answers: HTTP/1.1 with Content-Length, kept alive.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass


class LeanHTTPError(Exception):
    """An answer this client does not read (no Content-Length, a closed connection)."""


@dataclass(frozen=True)
class Answer:
    status: int
    seconds: float  # from the request's first byte sent to the answer's last byte read
    arrived: float  # time.time() when the answer's last byte was read


class LeanClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._host = host.encode()
        self._buf = b""

    def __enter__(self) -> LeanClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def post_json(self, path: str, body: bytes) -> Answer:
        request = b"".join(
            (
                b"POST ",
                path.encode(),
                b" HTTP/1.1\r\nHost: ",
                self._host,
                b"\r\nContent-Type: application/json\r\nContent-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )
        started = time.perf_counter()
        self._sock.sendall(request)
        status, length = self._read_head()
        self._read_exactly(length)
        seconds = time.perf_counter() - started
        return Answer(status, seconds, time.time())

    def _recv(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise LeanHTTPError("connection closed by the server")
        self._buf += chunk

    def _read_head(self) -> tuple[int, int]:
        while b"\r\n\r\n" not in self._buf:
            self._recv()
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return status, int(value)
        raise LeanHTTPError(f"answer {status} without Content-Length")

    def _read_exactly(self, n: int) -> None:
        while len(self._buf) < n:
            self._recv()
        self._buf = self._buf[n:]


def interleaved(
    path: str, targets: list[tuple[int, list[bytes]]], chunk: int, spacing: float = 0.0
) -> list[list[Answer]]:
    """POST each target's bodies to its port, `chunk` at a time from each target in turn
    (so that the host's slow and fast moments fall on all of them alike), each request sent
    when the last was answered and `spacing` seconds after it. The answers, by target."""
    clients = [LeanClient(port) for port, _ in targets]
    answers: list[list[Answer]] = [[] for _ in targets]
    try:
        longest = max(len(bodies) for _, bodies in targets)
        for start in range(0, longest, chunk):
            for client, (_, bodies), out in zip(clients, targets, answers, strict=True):
                for body in bodies[start : start + chunk]:
                    out.append(client.post_json(path, body))
                    if spacing:
                        time.sleep(spacing)
    finally:
        for client in clients:
            client.close()
    return answers
