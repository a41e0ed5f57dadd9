"""Postmark's webhooks.

How Postmark protects them ("Webhooks overview", https://postmarkapp.com/developer/webhooks/webhooks-overview,
and https://postmarkapp.com/email-webhooks: "secure them using HTTP Auth"): the webhook URL
carries basic-auth credentials (https://USER:PASSWORD@host/webhooks/postmark), checked here
in constant time; Postmark also publishes the addresses its webhooks come from, which
[webhooks] postmark_allow_ips may list.

Events: the Bounce webhook (RecordType "Bounce"; Type HardBounce, BadEmailAddress... hard,
SoftBounce, Transient, DnsError... soft; "Bounce webhook" reference), SpamComplaint, and
SubscriptionChange (SuppressSending true: the address was suppressed, for its
SuppressionReason; false: reactivated, which we leave to `subscribers restore`;
https://postmarkapp.com/developer/webhooks/subscription-change-webhook). Our message id
comes back in Metadata.message_id.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress

from ...outcome import COMPLAINT, HARD_BOUNCE, SOFT_BOUNCE, UNSUBSCRIBE, Event
from . import Incoming, Rejected, address, issue_of, malformed, parse_json, unauthorized

NAME = "postmark"
SOURCE = "postmark webhook"

_HARD = {"HardBounce", "BadEmailAddress", "ManuallyDeactivated"}
_SOFT = {"SoftBounce", "Transient", "DnsError", "AutoResponder", "Blocked", "SMTPApiError", "Unknown"}
_SUPPRESSION = {"HardBounce": HARD_BOUNCE, "SpamComplaint": COMPLAINT, "ManualSuppression": UNSUBSCRIBE,
                "Unsubscribe": UNSUBSCRIBE}


def configured(settings) -> bool:
    return bool(settings.postmark_username and settings.postmark_password)


def _check_credentials(incoming: Incoming) -> None:
    allow = incoming.settings.postmark_allow_ips
    if allow:
        try:
            networks = [ipaddress.ip_network(part.strip(), strict=False) for part in allow.split(",") if part.strip()]
            peer = ipaddress.ip_address(incoming.client or "")
        except ValueError:
            raise Rejected(403, "this address is not among [webhooks] postmark_allow_ips") from None
        if not any(peer in network for network in networks):
            raise Rejected(403, "this address is not among [webhooks] postmark_allow_ips")
    scheme, _, given = incoming.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic" or not given:
        raise unauthorized("no basic-auth credentials")
    try:
        user, sep, password = base64.b64decode(given, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise unauthorized("unreadable basic-auth credentials") from None
    # both compared, always: the time taken says nothing about which one was wrong
    good_user = hmac.compare_digest(user.encode(), incoming.settings.postmark_username.encode())
    good_password = hmac.compare_digest(password.encode(), incoming.settings.postmark_password.encode())
    if not (sep and good_user and good_password):
        raise unauthorized("wrong credentials")


async def events(incoming: Incoming) -> list[Event]:
    _check_credentials(incoming)
    body = parse_json(incoming.body, dict)
    record = body.get("RecordType")
    metadata = body.get("Metadata") if isinstance(body.get("Metadata"), dict) else {}
    issue = issue_of(metadata.get("message_id"))
    if record in ("Bounce", "SpamComplaint"):
        kind_name = body.get("Type")
        if record == "SpamComplaint" or kind_name == "SpamComplaint":
            kind = COMPLAINT
        elif kind_name == "Unsubscribe":
            kind = UNSUBSCRIBE
        elif kind_name in _HARD:
            kind = HARD_BOUNCE
        elif kind_name in _SOFT:
            kind = SOFT_BOUNCE
        else:
            return []  # SubscribeRequest, OpenRelayTest, ChallengeVerification...: not about the reader
        if body.get("ID") in (None, ""):
            raise malformed("no ID")
        reason = f"{kind_name or record}: {body.get('Description') or ''} {body.get('Details') or ''}".strip().rstrip(":")
        return [Event(kind, address(body.get("Email")), SOURCE, reason, f"{record}:{body['ID']}", issue)]
    if record == "SubscriptionChange":
        if body.get("SuppressSending") is not True:
            return []  # a reactivation: `subscribers restore` decides that here
        why = str(body.get("SuppressionReason", ""))
        recipient = address(body.get("Recipient"))
        # no ID of its own: the change is named by its message, recipient and time
        event_id = f"SubscriptionChange:{body.get('MessageID')}:{recipient.lower()}:{body.get('ChangedAt')}"
        return [Event(_SUPPRESSION.get(why, UNSUBSCRIBE), recipient, SOURCE, f"suppressed: {why}".rstrip(": "),
                      event_id, issue)]
    if not isinstance(record, str):
        raise malformed("no RecordType")
    return []  # Delivery, Open, Click...
