"""One module per provider's event webhook: each checks the request exactly as its provider
documents it, then turns the body into outcome.Event objects (newsletter/web/webhooks.py
holds what they share: reading the body, the answers, the store).

Every module has NAME, `configured(settings)` and `async events(incoming) -> list[Event]`,
raising Rejected (401 bad credentials, 400 malformed, ...) before anything is changed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import Headers

from ...config import Webhooks


class Rejected(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def unauthorized(message: str) -> Rejected:
    return Rejected(401, message)


def malformed(message: str) -> Rejected:
    return Rejected(400, message)


@dataclass
class Incoming:
    headers: Headers
    body: bytes
    client: str | None  # the peer's address (the proxy's, unless [serve] forwarded_allow_ips)
    settings: Webhooks
    state: dict = field(default_factory=dict)  # per provider, kept for the service's life (caches)
    token: str | None = None  # Mailgun: the token this request used (see mailgun.forget)


def parse_json(body: bytes, kind: type) -> Any:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested thousands deep
        raise malformed("the body is not JSON") from None
    if not isinstance(value, kind):
        raise malformed(f"expected a JSON {'array' if kind is list else 'object'}")
    return value


def text(value: Any, what: str) -> str:
    """A required string field of an event."""
    if not isinstance(value, str) or not value.strip():
        raise malformed(f"{what} is missing or not a string")
    return value.strip()


def address(value: Any, what: str = "the address") -> str:
    value = text(value, what)
    if "@" not in value or len(value) > 320 or any(c.isspace() for c in value):
        raise malformed(f"{what} is not an email address")
    return value


# Our Message-ID / X-Newsletter-Message-Id: "<issue stem>.<digest10>[.test].<recipient key>@domain"
# (message.MessageFactory.id_prefix). A proof (.test) names no delivery row.
_OUR_ID = re.compile(r"<?(?P<stem>[A-Za-z0-9][A-Za-z0-9._-]{0,99})\.[0-9a-f]{10}(?P<test>\.test)?"
                     r"\.[A-Za-z0-9_-]{22}@[^<>\s]+>?")


def issue_of(message_id: Any) -> str | None:
    """The issue our message was, from the id we gave it; None for anything else."""
    if not isinstance(message_id, str):
        return None
    match = _OUR_ID.fullmatch(message_id.strip())
    return match["stem"] if match and not match["test"] else None


def header_value(headers: Any, name: str) -> str | None:
    """A header from a provider's list of {name, value} or a mapping, by case-insensitive name."""
    name = name.lower()
    if isinstance(headers, dict):
        return next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == name), None)
    if isinstance(headers, list):
        for item in headers:
            if isinstance(item, dict) and str(item.get("name", "")).lower() == name:
                return item.get("value")
    return None
