"""Sending mail over SMTP, with failures sorted into retryable and permanent."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

import aiosmtplib

from shared.errors import PermanentError, RetryableError


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
        """smtp://user:pass@host:port (STARTTLS when offered) or smtps://... (implicit TLS).

        `?starttls=require` or `?starttls=off` overrides the default.
        """
        parts = urlsplit(url)
        implicit = parts.scheme == "smtps"
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        mode = query.get("starttls", "auto")
        start_tls = {"require": True, "off": False}.get(mode)
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or (465 if implicit else 25),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            use_tls=implicit,
            start_tls=False if implicit else start_tls,
            timeout=timeout,
        )


class Mailer:
    """Sends one message per SMTP connection: simple, and robust to servers that drop idle ones."""

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config

    async def send(self, message: EmailMessage) -> None:
        c = self.config
        try:
            await aiosmtplib.send(
                message,
                hostname=c.host,
                port=c.port,
                username=c.username,
                password=c.password,
                use_tls=c.use_tls,
                start_tls=c.start_tls,
                timeout=c.timeout,
                tls_context=ssl.create_default_context() if (c.use_tls or c.start_tls) else None,
            )
        except aiosmtplib.SMTPRecipientsRefused as e:
            codes = [r.code for r in e.recipients]
            if codes and all(500 <= code < 600 for code in codes):
                raise PermanentError(f"recipient refused: {codes}") from e
            raise RetryableError(f"recipient deferred: {codes}") from e
        except aiosmtplib.SMTPResponseException as e:
            if 500 <= e.code < 600 and e.code != _AUTH_FAILED:
                raise PermanentError(f"SMTP {e.code}: {e.message[:200]}") from e
            raise RetryableError(f"SMTP {e.code}: {e.message[:200]}") from e
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            # Connection refused or reset, timeouts, TLS trouble: the server may come back.
            raise RetryableError(f"SMTP unavailable: {type(e).__name__}: {e}") from e


# 535 is an authentication failure: a misconfiguration that an operator can fix, so it is
# retried (and alerted on) rather than dead-lettering every message.
_AUTH_FAILED = 535
