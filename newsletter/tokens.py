"""Unsubscribe tokens: opaque, signed, naming a recipient and a list, holding no address.

    token = base64url(version | recipient key (16) | list tag (4) | HMAC-SHA256 (16))

The recipient key is itself an HMAC of the lower-cased address, so the token reveals
nothing and cannot be made without NEWSLETTER_SECRET; the store keeps each address's key
so that an unsubscribe request can be matched to the address.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
from dataclasses import dataclass

VERSION = b"\x01"
KEY_BYTES, TAG_BYTES, SIG_BYTES = 16, 4, 16


class TokenError(ValueError):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@functools.lru_cache(maxsize=16)
def _list_tag(list_id: str) -> bytes:
    return hashlib.sha256(b"list:" + list_id.encode("utf-8")).digest()[:TAG_BYTES]


@dataclass(frozen=True)
class Signer:
    secret: bytes
    list_id: str

    def recipient_key(self, address: str) -> str:
        digest = hmac.new(self.secret, b"recipient:" + address.lower().encode("utf-8"), hashlib.sha256).digest()
        return _b64(digest[:KEY_BYTES])

    def _list_tag(self) -> bytes:
        return _list_tag(self.list_id)

    def token(self, recipient_key: str) -> str:
        key = base64.urlsafe_b64decode(recipient_key + "=" * (-len(recipient_key) % 4))
        payload = VERSION + key + self._list_tag()
        return _b64(payload + hmac.new(self.secret, payload, hashlib.sha256).digest()[:SIG_BYTES])

    def verify(self, token: str) -> str:
        """The recipient key inside a valid token for this list; TokenError otherwise."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raise TokenError("not a token") from None
        if _b64(raw) != token:  # only the canonical spelling: one token, one string
            raise TokenError("not a token")
        payload, sig = raw[:-SIG_BYTES], raw[-SIG_BYTES:]
        if len(raw) != 1 + KEY_BYTES + TAG_BYTES + SIG_BYTES or payload[:1] != VERSION:
            raise TokenError("not a token")
        if not hmac.compare_digest(sig, hmac.new(self.secret, payload, hashlib.sha256).digest()[:SIG_BYTES]):
            raise TokenError("bad signature")
        if payload[1 + KEY_BYTES:] != self._list_tag():
            raise TokenError("token of another list")
        return _b64(payload[1:1 + KEY_BYTES])
