"""Resend's webhooks.

How Resend signs them ("Verify Webhooks Requests", https://resend.com/docs/webhooks/verify-webhooks-requests,
which defers to Svix's scheme, "Verifying Webhooks Manually",
https://docs.svix.com/receiving/verifying-payloads/how-manual): headers svix-id,
svix-timestamp and svix-signature; the signed content is "{svix-id}.{svix-timestamp}.{raw body}",
HMAC-SHA256 keyed with the base64 secret after "whsec_", base64 again; the header holds
space-separated "v1,<signature>" entries (several during a key rotation), any one matching
is enough; a timestamp more than five minutes off is refused ([webhooks] max_age).

Events (https://resend.com/docs/webhooks/emails/bounced): email.bounced with
data.bounce.type Permanent (hard) or Transient/Undetermined (soft), email.complained. The
svix-id names the event (the same on every retry). Our X-Newsletter-Message-Id comes back in
data.headers when present.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

from ...outcome import COMPLAINT, HARD_BOUNCE, SOFT_BOUNCE, Event
from . import Incoming, address, header_value, issue_of, malformed, parse_json, unauthorized

NAME = "resend"
SOURCE = "resend webhook"


def configured(settings) -> bool:
    return bool(settings.resend_secret)


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def verify(incoming: Incoming) -> str:
    """The svix-id, once the signature and the timestamp are checked."""
    msg_id, timestamp, signatures = (incoming.headers.get(h, "") for h in ("svix-id", "svix-timestamp", "svix-signature"))
    if not (msg_id and timestamp and signatures):
        raise unauthorized("no svix-id, svix-timestamp or svix-signature header")
    try:
        key = _key(incoming.settings.resend_secret)
    except (binascii.Error, ValueError):
        raise unauthorized("[webhooks] resend_secret is not a whsec_ secret") from None
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{timestamp}.".encode() + incoming.body,
                                         hashlib.sha256).digest())
    matched = False
    for entry in signatures.split():
        version, _, given = entry.partition(",")
        # every entry compared: the time taken does not say which one matched
        matched |= version == "v1" and hmac.compare_digest(expected, given.encode())
    if not matched:
        raise unauthorized("no signature matches")
    try:
        age = time.time() - int(timestamp)
    except ValueError:
        raise unauthorized("svix-timestamp is not a number") from None
    if abs(age) > incoming.settings.max_age:
        raise unauthorized(f"svix-timestamp is {age:.0f} s off (at most {incoming.settings.max_age:.0f} s taken)")
    return msg_id


async def events(incoming: Incoming) -> list[Event]:
    msg_id = verify(incoming)
    body = parse_json(incoming.body, dict)
    kind_name, data = body.get("type"), body.get("data")
    if kind_name not in ("email.bounced", "email.complained"):
        if not isinstance(kind_name, str):
            raise malformed("no type")
        return []  # email.sent, email.delivered, email.opened...
    if not isinstance(data, dict):
        raise malformed("no data object")
    if kind_name == "email.bounced":
        bounce = data.get("bounce") if isinstance(data.get("bounce"), dict) else {}
        kind = HARD_BOUNCE if bounce.get("type") == "Permanent" else SOFT_BOUNCE
        reason = " ".join(str(bounce[k]) for k in ("type", "subType", "message") if bounce.get(k)) or "bounced"
    else:
        kind, reason = COMPLAINT, "complained"
    recipients = data.get("to")
    recipients = [recipients] if isinstance(recipients, str) else recipients
    if not isinstance(recipients, list) or not recipients:
        raise malformed("data.to names nobody")
    issue = issue_of(header_value(data.get("headers"), "X-Newsletter-Message-Id"))
    if issue is None and isinstance(data.get("tags"), (dict, list)):
        issue = issue_of(header_value(data["tags"], "message_id"))
    return [Event(kind, address(to), SOURCE, reason, msg_id if len(recipients) == 1 else f"{msg_id}:{i}", issue)
            for i, to in enumerate(recipients)]
