"""Email addresses as SMTP without the SMTPUTF8 extension can carry them."""

from __future__ import annotations

from email.errors import MessageError
from email.headerregistry import Address

from email_validator import EmailNotValidError, validate_email


def ascii_address(address: str) -> str | None:
    """The address as an email can be sent to it: in ASCII, an internationalized domain in
    its IDNA form (the same mailbox however it was typed). None when the mailbox name is
    beyond ASCII, which only SMTPUTF8 (from every server on the way) could deliver, or when
    the standard library cannot write it in a To header: a mailbox name that reads as an
    RFC 2047 encoded word ("=?utf-8?q?a?=") is valid to an address validator and raises
    there."""
    sendable: str | None = address
    if not address.isascii():
        try:
            sendable = validate_email(address, check_deliverability=False).ascii_email
        except EmailNotValidError:
            return None
    if sendable is None:
        return None
    try:
        Address(addr_spec=sendable)
    except (ValueError, MessageError):  # InvalidHeaderDefect, CharsetError ("=?x?q?y?=")
        return None
    return sendable
