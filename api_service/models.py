"""Request and response models: they validate the API and generate its OpenAPI document."""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, EmailStr, Field

from shared.addresses import ascii_address

# Refused in every text field: control characters (C0, DEL and C1), the line and paragraph
# separators, and the bidirectional controls, which would let a name display as something
# else in the email's To: header and greeting. Other format characters stay: the zero-width
# joiners are part of how some scripts and emoji are written.
_REFUSED = (
    r"\u0000-\u001f\u007f-\u009f\u2028\u2029"
    r"\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
)
_REFUSED_RE = re.compile(f"[{_REFUSED}]")


def _no_control_chars(value: str) -> str:
    if _REFUSED_RE.search(value):
        raise ValueError("must not contain control characters")
    return value


# Normalised before validation, so that the length limits count what is stored and hashed
# (NFC may turn one code point into three, NFKC into eighteen, and both two into one).
# Anything but a string passes through, for the type check to refuse.
def _nfc(value: object) -> object:
    """One form for the same name however it was typed (é as one code point or two)."""
    return unicodedata.normalize("NFC", value) if isinstance(value, str) else value


def _nfkc(value: object) -> object:
    """Passwords are hashed in NFKC (NIST SP 800-63B, 5.1.1.2), so that the same password
    typed on two keyboards gives the same hash."""
    return unicodedata.normalize("NFKC", value) if isinstance(value, str) else value


Username = Annotated[
    str,
    Field(
        min_length=3,
        max_length=32,
        pattern=r"^[a-z0-9_]+$",
        description="3 to 32 characters: lowercase letters, digits, underscore.",
        examples=["alice_01"],
    ),
]
# The pattern documents the rule in the OpenAPI schema; the validator enforces it with a
# clearer message than "should match pattern".
_PRINTABLE = {"pattern": f"^[^{_REFUSED}]*$"}

FullName = Annotated[
    str,
    Field(min_length=1, max_length=100, examples=["Alice Liddell"], json_schema_extra=_PRINTABLE),
    AfterValidator(_no_control_chars),
    BeforeValidator(_nfc),
]
# The upper bound keeps hashing cheap to refuse: no megabyte passwords through argon2.
Password = Annotated[
    str,
    Field(
        min_length=8,
        max_length=128,
        description="8 to 128 characters, no control characters.",
        json_schema_extra=_PRINTABLE,
    ),
    AfterValidator(_no_control_chars),
    BeforeValidator(_nfkc),
]


def _sendable(value: str) -> str:
    """Refused here, rather than accepted and then never delivered, when the mailbox name is
    beyond ASCII (only SMTPUTF8 could carry it). An internationalized domain is kept as
    EmailStr normalises it (Unicode, whichever form was typed: one mailbox, one row); the
    worker sends it in its ASCII form (shared.addresses)."""
    if ascii_address(value) is None:
        raise ValueError(
            "the part before the @ must be ASCII, and not read as an encoded word (=?...?=)"
        )
    return value


def _bare_address(value: object) -> object:
    """EmailStr also takes the "Name <address>" form and keeps only the address: a caller
    who sent that sent something other than an address, and is told so."""
    if isinstance(value, str) and ("<" in value or ">" in value):
        raise ValueError("give the address alone, without a name or angle brackets")
    return value


Email = Annotated[
    EmailStr,
    Field(
        max_length=254,
        examples=["alice@example.com"],
        description=(
            "A deliverable address: stricter than the `email` format, special-use domains"
            " (.test, .invalid, .local, localhost) are refused. Unique regardless of case."
            " The part before the @ must be ASCII; an internationalized domain is accepted"
            " in either form and stored in Unicode. The address alone: no display name."
        ),
    ),
    AfterValidator(_sendable),
    BeforeValidator(_bare_address),
]


class SignupRequest(BaseModel):
    """Create a user; a verification email is sent to `email`."""

    model_config = ConfigDict(extra="forbid", strict=True, title="SignupRequest")

    username: Username
    full_name: FullName
    email: Email
    password: Password


class ResendRequest(BaseModel):
    """Ask for a new verification email (the link in the last one expired or was lost)."""

    model_config = ConfigDict(extra="forbid", strict=True, title="ResendRequest")

    email: Email


class ResendAccepted(BaseModel):
    model_config = ConfigDict(title="ResendAccepted")

    detail: str


class User(BaseModel):
    model_config = ConfigDict(title="User")

    username: str
    full_name: str
    email: str
    is_email_verified: bool
    created_at: datetime


class VerifyEmailQuery(BaseModel):
    model_config = ConfigDict(extra="ignore", title="VerifyEmailQuery")

    email_id: Annotated[int, Field(ge=1, le=2**63 - 1)]
    secret_code: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]


class VerifyEmailResult(BaseModel):
    model_config = ConfigDict(title="VerifyEmailResult")

    is_verified: bool


class InvalidParam(BaseModel):
    name: str
    reason: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(title="Problem")

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    invalid_params: list[InvalidParam] | None = Field(
        default=None, serialization_alias="invalid-params"
    )


class Health(BaseModel):
    model_config = ConfigDict(title="Health")

    status: str
