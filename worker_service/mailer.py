"""Sending mail over SMTP, with failures sorted into retryable and permanent."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

import aiosmtplib

from shared.errors import ConfigError, PermanentError, RetryableError
from shared.lifecycle import finish_uncut, spend_cancellation

# QUIT comes after the send is recorded: its answer is not waited for longer than this.
QUIT_WITHIN_SECONDS = 5.0

# ?starttls= in SMTP_URL: None upgrades when the server offers it (with no credentials).
_STARTTLS_MODES: dict[str, bool | None] = {"auto": None, "require": True, "off": False}


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    port: int
    username: str | None
    password: str | None
    use_tls: bool  # implicit TLS (smtps://)
    start_tls: bool | None  # None: upgrade when the server offers it
    timeout: float

    @classmethod
    def from_url(cls, url: str, timeout: float = 30.0) -> SmtpConfig:
        """smtp://host:port (STARTTLS when offered), smtp://user:pass@host:port (STARTTLS
        required: a password never goes over a connection a man in the middle stripped of
        TLS), or smtps://... (implicit TLS).

        `?starttls=require` or `?starttls=off` overrides the default; anything else is a
        ConfigError.
        """
        parts = urlsplit(url)
        implicit = parts.scheme == "smtps"
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        mode = query.get("starttls", "auto")
        if mode not in _STARTTLS_MODES:
            raise ConfigError(
                f"invalid configuration: SMTP_URL: starttls={mode!r}: use require, off or"
                " leave it out"
            )
        username = unquote(parts.username) if parts.username else None
        start_tls = _STARTTLS_MODES[mode]
        if start_tls is None and username is not None:
            start_tls = True
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or (465 if implicit else 25),
            username=username,
            password=unquote(parts.password) if parts.password else None,
            use_tls=implicit,
            start_tls=False if implicit else start_tls,
            timeout=timeout,
        )


class Mailer:
    """Sends one message per SMTP connection: simple, and robust to servers that drop idle ones."""

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config

    async def send(
        self, message: EmailMessage, then: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Send `message`, then run `then` (what records the send) before QUIT.

        From the message's first command to the end of `then`, a cancellation (the handler's
        timeout, a stop) waits for them (finish_uncut): once DATA is under way the server
        may have taken the message, and an email taken but not recorded would go out again,
        with another link, at the next attempt. Once they are done the send has succeeded,
        whatever comes after: a cancellation that came meanwhile, or comes during QUIT,
        closes the connection without waiting, and a QUIT that fails or takes longer than
        QUIT_WITHIN_SECONDS changes nothing. Connecting comes before, and is cancellable.
        """
        c = self.config
        client = aiosmtplib.SMTP(
            hostname=c.host,
            port=c.port,
            username=c.username,
            password=c.password,
            use_tls=c.use_tls,
            start_tls=c.start_tls,
            timeout=c.timeout,
            tls_context=ssl.create_default_context() if (c.use_tls or c.start_tls) else None,
        )
        with _sorted_errors():
            await client.connect()
        try:
            _, cancelled = await finish_uncut(self._deliver(client, message, then))
        except BaseException:
            client.close()
            raise
        if cancelled:
            client.close()
            return
        try:
            await asyncio.wait_for(client.quit(), min(c.timeout, QUIT_WITHIN_SECONDS))
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            client.close()
        except asyncio.CancelledError:
            # Spent here: the message is out and recorded, and ending at once (the socket
            # closed) is what the canceller wants.
            client.close()
            spend_cancellation()

    async def _deliver(
        self,
        client: aiosmtplib.SMTP,
        message: EmailMessage,
        then: Callable[[], Awaitable[None]] | None,
    ) -> None:
        with _sorted_errors():
            await client.send_message(message)
        if then is not None:
            await then()


@contextlib.contextmanager
def _sorted_errors() -> Iterator[None]:
    """aiosmtplib's failures as RetryableError or PermanentError.

    Permanent only when the refusal is about this message: its recipient (RCPT) or its
    content (DATA). Refusals of the connection, of HELO, of our sender (MAIL FROM), of
    authentication or TLS, and policy refusals (5.7.x: relaying denied, authentication
    required) say the server or the configuration is wrong for every message: those are
    retried (and alerted on) instead of dead-lettering every signup's email until an
    operator replays them all.
    """
    try:
        yield
    except aiosmtplib.SMTPRecipientsRefused as e:
        refused = [(r.code, r.message) for r in e.recipients]
        codes = [code for code, _ in refused]
        if refused and all(_about_this_message(code, text) for code, text in refused):
            raise PermanentError(f"recipient refused: {codes}") from e
        raise RetryableError(f"recipient not accepted: {codes}") from e
    except aiosmtplib.SMTPDataError as e:
        if _about_this_message(e.code, e.message):
            raise PermanentError(f"SMTP {e.code}: {e.message[:200]}") from e
        raise RetryableError(f"SMTP {e.code}: {e.message[:200]}") from e
    except aiosmtplib.SMTPResponseException as e:
        raise RetryableError(f"SMTP {e.code}: {e.message[:200]}") from e
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
        # Connection refused or reset, timeouts, TLS trouble: the server may come back.
        raise RetryableError(f"SMTP unavailable: {type(e).__name__}: {e}") from e


# A refusal to relay in the words of a server that gives no enhanced status code (Exim's
# stock "550 relay not permitted"): our configuration, not this message. The phrase only,
# with the addresses in the reply taken out first: "<relay@example.com>: User unknown" and
# "User unknown in relay recipient table" are about the mailbox.
_RELAY_REFUSED = re.compile(
    r"\brelay(ing)?\s+(access\s+)?(not\s+permitted|not\s+allowed|denied|prohibited|refused)\b",
    re.IGNORECASE,
)
_ADDRESSES = re.compile(r"<[^>]*>|\S+@\S+")


def _about_this_message(code: int, text: str) -> bool:
    """A 5xx that is not a security or policy refusal: enhanced status 5.7.x, or, from a
    server that gives no enhanced status, a refusal to relay."""
    if not 500 <= code < 600:
        return False
    text = text.lstrip()
    if text.startswith("5.7."):
        return False
    enhanced = re.match(r"#?[245]\.\d{1,3}\.\d{1,3}\b", text) is not None
    return enhanced or not _RELAY_REFUSED.search(_ADDRESSES.sub(" ", text))
