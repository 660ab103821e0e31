"""Verification codes: made by the worker, checked by the API, stored only as hashes."""

from __future__ import annotations

import hashlib
import secrets


def new_code() -> str:
    """256 bits from the OS's cryptographic RNG, URL-safe."""
    return secrets.token_urlsafe(32)


def hash_code(code: str) -> bytes:
    # The code is random and long, so a fast unsalted hash cannot be brute-forced; a slow
    # password hash would only cost CPU on every link click.
    return hashlib.sha256(code.encode()).digest()
