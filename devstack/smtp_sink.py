"""An SMTP server that stores every message as an .eml file: `python -m devstack.smtp_sink`.

For tests it can also misbehave on purpose: refuse with a 4xx (transient) or 5xx
(permanent) reply to RCPT or DATA, to show how the worker handles each.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import hashlib
import threading
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


class MaildirHandler:
    """aiosmtpd handler: one file per message, named so that order and identity are clear."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        # "" accepts; otherwise the reply to give to DATA, e.g. "451 4.3.0 try later".
        self.fail_with = ""
        # The same for MAIL FROM and RCPT TO.
        self.fail_mail_with = ""
        self.fail_rcpt_with = ""
        self.delay_seconds = 0.0  # before taking the message at DATA (stored after it)
        self.answer_delay_seconds = 0.0  # after storing it, before answering DATA
        self.quit_delay_seconds = 0.0  # before answering QUIT
        self.received = 0
        self._lock = threading.Lock()

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.fail_mail_with:
            return self.fail_mail_with
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.fail_rcpt_with:
            return self.fail_rcpt_with
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.quit_delay_seconds:
            await asyncio.sleep(self.quit_delay_seconds)
        return "221 Bye"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        if self.fail_with:
            return self.fail_with
        data: bytes = envelope.original_content or b""
        msg = email.message_from_bytes(data, policy=email.policy.default)
        ident = hashlib.sha1(data, usedforsecurity=False).hexdigest()[:12]
        name = f"{time.time_ns()}-{ident}.eml"
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.rename(self.directory / name)  # readers never see half a file
        with self._lock:
            self.received += 1
        del msg
        if self.answer_delay_seconds:  # taken, and the answer slow to come
            await asyncio.sleep(self.answer_delay_seconds)
        return "250 Message accepted for delivery"


class SmtpSink:
    """The sink in a thread of this process (tests), with a handle to make it misbehave."""

    def __init__(self, directory: Path, port: int = 0, host: str = "127.0.0.1") -> None:
        self.handler = MaildirHandler(directory)
        self.controller = Controller(self.handler, hostname=host, port=port or _free_port())
        self.directory = directory
        self._listening = False

    @property
    def port(self) -> int:
        return int(self.controller.port)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.controller.start()
        self._listening = True

    def stop(self) -> None:
        """Stop listening, if it is (a chaos drill stopped in the middle of an SMTP outage:
        aiosmtpd's stop() of a stopped controller raises, and the teardown after it, of
        Postgres and Redis, would not run)."""
        if self._listening:
            self._listening = False
            self.controller.stop()

    def refuse_connections(self) -> None:
        """Stop listening: the worker's connections are refused."""
        self.stop()

    def accept_connections(self) -> None:
        self.controller = Controller(
            self.handler, hostname=self.controller.hostname, port=self.controller.port
        )
        self.start()

    def messages(self) -> list[EmailMessage]:
        return [msg for _path, msg in stored(self.directory)]


def stored(directory: Path) -> list[tuple[Path, EmailMessage]]:
    """The messages a sink stored in `directory`, oldest first (their files are named by
    the time they arrived), each with its file."""
    out = []
    for path in sorted(directory.glob("*.eml")):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        out.append((path, msg))
    return out


def _free_port() -> int:
    from devstack.procs import free_port

    return free_port()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack.smtp_sink")
    parser.add_argument("--dir", type=Path, default=Path(".data/mail"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    args = parser.parse_args(argv)
    sink = SmtpSink(args.dir, args.port, args.host)
    sink.start()
    print(f"smtp sink on {args.host}:{sink.port}, mail in {args.dir}", flush=True)
    stop = threading.Event()
    import signal

    def _stop(*_a: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # Woken now and then: a signal the server's thread takes runs its handler only when
    # the main thread next runs Python code, which a wait with no timeout never does.
    while not stop.wait(0.5):
        pass
    sink.stop()


if __name__ == "__main__":
    main()
