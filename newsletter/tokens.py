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
TOKEN_LENGTH = -(-(1 + KEY_BYTES + TAG_BYTES + SIG_BYTES) * 4 // 3)  # unpadded base64: 50 characters


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

    @functools.cached_property
    def _pads(self) -> tuple:
        """HMAC-SHA256's inner and outer hashes with the key absorbed (RFC 2104): copying
        them costs half of what hmac.new does, once or twice per recipient."""
        key = self.secret if len(self.secret) <= 64 else hashlib.sha256(self.secret).digest()
        key = key.ljust(64, b"\0")
        return (hashlib.sha256(bytes(b ^ 0x36 for b in key)), hashlib.sha256(bytes(b ^ 0x5C for b in key)))

    def _hmac(self, data: bytes) -> bytes:
        inner_pad, outer_pad = self._pads
        inner = inner_pad.copy()
        inner.update(data)
        outer = outer_pad.copy()
        outer.update(inner.digest())
        return outer.digest()

    def recipient_key(self, address: str) -> str:
        return _b64(self._hmac(b"recipient:" + address.lower().encode("utf-8"))[:KEY_BYTES])

    def _list_tag(self) -> bytes:
        return _list_tag(self.list_id)

    def token(self, recipient_key: str) -> str:
        key = base64.urlsafe_b64decode(recipient_key + "=" * (-len(recipient_key) % 4))
        payload = VERSION + key + self._list_tag()
        return _b64(payload + self._hmac(payload)[:SIG_BYTES])

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
        if not hmac.compare_digest(sig, self._hmac(payload)[:SIG_BYTES]):
            raise TokenError("bad signature")
        if payload[1 + KEY_BYTES:] != self._list_tag():
            raise TokenError("token of another list")
        return _b64(payload[1:1 + KEY_BYTES])
