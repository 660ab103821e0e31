"""The verification links in the development mailbox: `python -m devstack.mail`.

    python -m devstack.mail [--to ADDRESS] [--all] [--dir .data/mail]

Prints the link of the newest email (to ADDRESS, if given), or of every one with --all,
oldest first. It reads the messages as a mail client does: the text is quoted-printable
when a name is beyond ASCII, and a grep of the .eml files then finds no link.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from devstack.smtp_sink import stored

_LINK = re.compile(r"https?://\S+/v1/verify_email\?\S+")


@dataclass(frozen=True)
class Mailed:
    path: Path
    to: str  # the address, lowercased
    link: str


def verification_link(msg: EmailMessage) -> str | None:
    body = msg.get_body(preferencelist=("plain",))
    m = _LINK.search(body.get_content() if body is not None else "")
    return m.group(0) if m else None


def mailbox(directory: Path) -> list[Mailed]:
    """Every email in the sink's folder with a verification link, oldest first."""
    out = []
    for path, msg in stored(directory):
        link = verification_link(msg)
        addresses = getattr(msg["To"], "addresses", ())  # parsed, as a mail client does
        if link is not None and addresses:
            out.append(Mailed(path, addresses[0].addr_spec.lower(), link))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devstack.mail", description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=Path(".data/mail"), help="the sink's folder")
    p.add_argument("--to", help="only emails to this address")
    p.add_argument("--all", action="store_true", help="every link, oldest first")
    args = p.parse_args(argv)
    found = [m for m in mailbox(args.dir) if args.to is None or m.to == args.to.lower()]
    if not found:
        to = f" to {args.to}" if args.to else ""
        print(f"no verification email{to} in {args.dir}", file=sys.stderr)
        return 1
    for m in found if args.all else found[-1:]:
        print(m.link)
    return 0


if __name__ == "__main__":
    sys.exit(main())
