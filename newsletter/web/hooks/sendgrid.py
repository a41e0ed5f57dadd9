"""SendGrid's Signed Event Webhook.

How SendGrid signs it ("Getting Started with the Event Webhook Security Features",
https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features):
an ECDSA (P-256) signature with SHA-256 over the X-Twilio-Email-Event-Webhook-Timestamp
header followed by the raw body, base64 in X-Twilio-Email-Event-Webhook-Signature; the
verification key (base64 DER SubjectPublicKeyInfo) is shown under Mail Settings. SendGrid
documents no timestamp tolerance, so none is applied: a replayed batch changes nothing twice
by each event's sg_event_id.

Events ("Event Webhook Reference"): bounce with type "bounce" (hard) or "blocked" (soft);
dropped (by its reason: a suppressed bounced, unsubscribed or spam-reporting address, or the
message's own fault); spamreport; unsubscribe; group_unsubscribe. Our custom_args message_id
comes back as a top-level field of each event.
"""

from __future__ import annotations

import base64
import binascii
import logging

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ...outcome import COMPLAINT, HARD_BOUNCE, SOFT_BOUNCE, UNSUBSCRIBE, Event, bounce_kind
from . import Incoming, address, issue_of, malformed, parse_json, unauthorized

NAME = "sendgrid"
log = logging.getLogger("newsletter.webhooks")
SOURCE = "sendgrid webhook"
SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"

# dropped: SendGrid did not send, and says why (its own suppression lists first)
_DROPPED = {"bounced address": HARD_BOUNCE, "invalid": HARD_BOUNCE, "unsubscribed address": UNSUBSCRIBE,
            "spam reporting address": COMPLAINT}


def configured(settings) -> bool:
    return bool(settings.sendgrid_public_key)


def public_key(text: str) -> ec.EllipticCurvePublicKey:
    if "BEGIN PUBLIC KEY" in text:
        key = serialization.load_pem_public_key(text.encode())
    else:
        key = serialization.load_der_public_key(base64.b64decode(text))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an elliptic-curve key")
    return key


async def events(incoming: Incoming) -> list[Event]:
    signature, timestamp = incoming.headers.get(SIGNATURE), incoming.headers.get(TIMESTAMP)
    if not signature or not timestamp:
        raise unauthorized(f"no {SIGNATURE} or {TIMESTAMP} header")
    key_text = incoming.settings.sendgrid_public_key
    if incoming.state.get("key_text") != key_text:  # parsed once, not per request
        try:
            incoming.state["key"] = public_key(key_text)
        except (ValueError, binascii.Error, TypeError):
            raise unauthorized("[webhooks] sendgrid_public_key is not SendGrid's verification key") from None
        incoming.state["key_text"] = key_text
    try:
        incoming.state["key"].verify(base64.b64decode(signature, validate=True),
                                     timestamp.encode() + incoming.body, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        raise unauthorized("the signature does not match") from None
    batch = parse_json(incoming.body, list)
    found = []
    for item in batch:
        if not isinstance(item, dict):
            raise malformed("each event must be a JSON object")
        kind, reason = _kind(item)
        if kind == HARD_BOUNCE and item.get("event") == "bounce" and item.get("reason"):
            # the receiving server's reply, judged as every other door judges one: a refusal of
            # the sender or the server (a block list, relay denied) is not the reader's
            kind = bounce_kind(str(item.get("status") or ""), str(item["reason"]))
            if kind is None:
                log.warning("sendgrid webhook: a bounce that is not the reader's fault, nobody suppressed "
                            "(check the sending settings): %s", reason)
        if kind is None:
            continue
        event_id = item.get("sg_event_id")
        if not isinstance(event_id, str) or not event_id:
            raise malformed("an event has no sg_event_id")
        found.append(Event(kind, address(item.get("email")), SOURCE, reason, event_id,
                           issue_of(item.get("message_id"))))
    return found


def _kind(item: dict) -> tuple[str | None, str]:
    event = item.get("event")
    words = " ".join(str(item[k]) for k in ("status", "reason") if item.get(k)).strip()
    if event == "bounce":
        kind = SOFT_BOUNCE if item.get("type") == "blocked" else HARD_BOUNCE
        return kind, f"{item.get('type', 'bounce')}: {words}".rstrip(": ")
    if event == "dropped":
        return _DROPPED.get(str(item.get("reason", "")).strip().lower(), SOFT_BOUNCE), f"dropped: {words}".rstrip(": ")
    if event == "spamreport":
        return COMPLAINT, "spamreport"
    if event in ("unsubscribe", "group_unsubscribe"):
        group = f" (group {item['asm_group_id']})" if item.get("asm_group_id") is not None else ""
        return UNSUBSCRIBE, f"{event}{group}"
    return None, ""  # processed, delivered, deferred, open, click...: nothing to do
