"""A lean HTTP/1.1 client for latency figures: one blocking keep-alive socket, no event loop.

aiohttp's client costs about 0.2 ms of its own per request on this machine (a handler
that only answers 201: 0.34 ms through it, 0.16 ms through this client, measured
2026-11-29), which a figure of the API's own overhead should not count. This client sends
one request, reads the answer to its last byte and stops the clock: what it adds is a
send() and the recv()s that wake it. Run it in a thread (`asyncio.to_thread`).

It speaks only what the API answers: HTTP/1.1 with Content-Length. A connection the
server closes (`Connection: close`, or a failure) is opened again for the next request.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

NO_ANSWER = 0  # Answer.status of a request that got no answer (connection lost, timeout)


class LeanHTTPError(Exception):
    """An answer this client does not read (no Content-Length, a closed connection)."""


@dataclass(frozen=True)
class Answer:
    status: int  # NO_ANSWER if none came
    seconds: float  # from the request's first byte sent to the answer's last byte read
    arrived: float  # time.time() when the answer's last byte was read (or the failure)
    sent: float = 0.0  # time.perf_counter() when the request's first byte went out
    body: bytes = b""  # the answer's body (empty if none came)


class LeanClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self._address = (host, port)
        self._timeout = timeout
        self._host = host.encode()
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> LeanClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buf = None, b""

    def post_json(self, path: str, body: bytes) -> Answer:
        """The answer to one POST; a failure is an Answer with status NO_ANSWER."""
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
        try:
            if self._sock is None:
                self._sock = socket.create_connection(self._address, timeout=self._timeout)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                started = time.perf_counter()  # the connect is not the request's time
            self._sock.sendall(request)
            status, length, close = self._read_head()
            body = self._read_exactly(length)
        except (OSError, LeanHTTPError, ValueError, IndexError):  # the last two: a bad head
            self.close()
            return Answer(NO_ANSWER, time.perf_counter() - started, time.time(), started)
        answer = Answer(status, time.perf_counter() - started, time.time(), started, body)
        if close:
            self.close()
        return answer

    def _recv(self) -> None:
        assert self._sock is not None
        chunk = self._sock.recv(65536)
        if not chunk:
            raise LeanHTTPError("connection closed by the server")
        self._buf += chunk

    def _read_head(self) -> tuple[int, int, bool]:
        """(status, Content-Length, whether the server closes the connection after it)."""
        while b"\r\n\r\n" not in self._buf:
            self._recv()
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if b"content-length" not in headers:
            raise LeanHTTPError(f"answer {status} without Content-Length")
        return status, int(headers[b"content-length"]), headers.get(b"connection") == b"close"

    def _read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._recv()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data


def interleaved(
    path: str, targets: list[tuple[int, list[bytes]]], chunk: int, spacing: float = 0.0
) -> list[list[Answer]]:
    """POST each target's bodies to its port, `chunk` at a time from each target in turn
    (so that the host's slow and fast moments fall on all of them alike), each request sent
    when the last was answered and `spacing` seconds after it. The answers, by target."""
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
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
