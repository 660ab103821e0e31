"""The versioned envelope carried in one field of a stream entry."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from shared.constants import ENVELOPE_FIELD, ENVELOPE_VERSION
from shared.errors import EnvelopeError


@dataclass(frozen=True, slots=True)
class Envelope:
    """One task: what to do (type, payload), and where it came from (event id, headers)."""

    event_id: str
    type: str
    payload: dict[str, Any]
    created_at: datetime
    headers: dict[str, str] = field(default_factory=dict)
    version: int = ENVELOPE_VERSION

    @property
    def request_id(self) -> str | None:
        return self.headers.get("request_id")

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": self.version,
                "id": self.event_id,
                "type": self.type,
                "payload": self.payload,
                "created_at": self.created_at.isoformat(),
                "headers": self.headers,
            }
        )

    @classmethod
    def decode(cls, fields: dict[bytes, bytes]) -> Envelope:
        """Decode a stream entry's fields, or raise EnvelopeError saying why not."""
        raw = fields.get(ENVELOPE_FIELD.encode())
        if raw is None:
            raise EnvelopeError(f"entry has no {ENVELOPE_FIELD!r} field")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise EnvelopeError(f"envelope is not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise EnvelopeError("envelope is not a JSON object")
        if doc.get("v") != ENVELOPE_VERSION:
            raise EnvelopeError(f"unsupported envelope version {doc.get('v')!r}")
        try:
            event_id = str(uuid.UUID(str(doc["id"])))
            task_type = doc["type"]
            payload = doc["payload"]
            created_at = datetime.fromisoformat(doc["created_at"])
            headers = doc.get("headers") or {}
        except (KeyError, ValueError, TypeError) as e:
            raise EnvelopeError(f"malformed envelope: {e!r}") from e
        if not isinstance(task_type, str) or not isinstance(payload, dict):
            raise EnvelopeError("envelope type must be a string and payload an object")
        if not isinstance(headers, dict):
            raise EnvelopeError("envelope headers must be an object")
        if created_at.tzinfo is None:
            created_at = created_at.replace(tzinfo=UTC)
        return cls(
            event_id=event_id,
            type=task_type,
            payload=payload,
            created_at=created_at,
            headers={str(k): str(v) for k, v in headers.items()},
        )
