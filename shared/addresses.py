"""Email addresses as SMTP without the SMTPUTF8 extension can carry them."""

from __future__ import annotations

from email_validator import EmailNotValidError, validate_email


def ascii_address(address: str) -> str | None:
    """The address in ASCII: an internationalized domain in its IDNA form (the same mailbox
    however it was typed), or None when the mailbox name itself is beyond ASCII, which only
    SMTPUTF8 (from every server on the way) could deliver."""
    if address.isascii():
        return address
    try:
        return validate_email(address, check_deliverability=False).ascii_email
    except EmailNotValidError:
        return None
