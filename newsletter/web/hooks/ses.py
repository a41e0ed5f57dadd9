"""Amazon SES events, delivered by Amazon SNS to an HTTPS subscription.

How SNS signs its messages ("Verifying the signatures of Amazon SNS messages",
https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html and
https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message-verify-message-signature.html):
the string to sign is "name\\nvalue\\n" for Message, MessageId, Subject (when present),
Timestamp, TopicArn, Type of a Notification, and Message, MessageId, SubscribeURL, Timestamp,
Token, TopicArn, Type of a (Un)SubscriptionConfirmation; SignatureVersion 1 is SHA1withRSA,
2 SHA256withRSA; the certificate is fetched over https from SigningCertURL, whose host must
be Amazon SNS's (sns.<region>.amazonaws.com; [webhooks] sns_cert_host), and cached.
A SubscriptionConfirmation is confirmed by visiting its SubscribeURL (same host rule);
[webhooks] ses_topic_arns may restrict the topics taken.

The Message of a Notification is the SES event ("Contents of notifications for Amazon SES",
https://docs.aws.amazon.com/ses/latest/dg/notification-contents.html): notificationType (or
eventType, for event publishing) Bounce with bounceType Permanent (hard) or Transient /
Undetermined (soft) and bouncedRecipients, or Complaint with complainedRecipients; each
recipient is one event, named by the SES feedbackId. Our X-Newsletter-Message-Id is in
mail.headers (SES replaces the Message-ID).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import ssl
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ...outcome import COMPLAINT, HARD_BOUNCE, SOFT_BOUNCE, Event, bounce_kind
from . import Incoming, Rejected, address, header_value, issue_of, malformed, parse_json, unauthorized

NAME = "ses"
log = logging.getLogger("newsletter.webhooks")
SOURCE = "ses webhook"

_SIGNED = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
    "UnsubscribeConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
}
_HASHES = {"1": hashes.SHA1, "2": hashes.SHA256}
_CACHE_SIZE = 32


def configured(settings) -> bool:
    return settings.ses_enabled


def string_to_sign(message: dict) -> bytes:
    fields = _SIGNED[message["Type"]]
    parts = []
    for name in fields:
        value = message.get(name)
        if value is None and name == "Subject":
            continue  # only when present
        if not isinstance(value, str):
            raise malformed(f"no {name}")
        parts.append(f"{name}\n{value}\n")
    return "".join(parts).encode("utf-8")


def _amazon_url(incoming: Incoming, url, what: str) -> str:
    parts = urlsplit(url) if isinstance(url, str) else None
    pattern = incoming.settings.sns_cert_host
    if not parts or parts.scheme != "https" or not parts.hostname or not re.fullmatch(pattern, parts.hostname, re.I):
        raise unauthorized(f"{what} is not an https URL of Amazon SNS")
    return url


def _client(incoming: Incoming) -> httpx.AsyncClient:
    if "client" not in incoming.state:
        context = ssl.create_default_context()
        if incoming.settings.sns_ca_file:
            context.load_verify_locations(cafile=str(incoming.settings.sns_ca_file))
        # no redirects: a redirect could lead anywhere, and SNS's URLs answer directly
        incoming.state["client"] = httpx.AsyncClient(verify=context, timeout=10, follow_redirects=False)
    return incoming.state["client"]


async def _fetch(incoming: Incoming, url: str, what: str) -> httpx.Response:
    """GET an Amazon URL (already checked by _amazon_url); 502 when it does not answer 200."""
    try:
        response = await _client(incoming).get(url)
    except httpx.HTTPError as exc:
        raise Rejected(502, f"could not fetch {what}: {type(exc).__name__}") from None
    if response.status_code != 200:
        raise Rejected(502, f"{what} answered {response.status_code}")
    return response


async def _certificate_key(incoming: Incoming, url: str) -> rsa.RSAPublicKey:
    cache: dict = incoming.state.setdefault("certificates", {})
    if url not in cache:
        response = await _fetch(incoming, url, "the signing certificate")
        try:
            key = x509.load_pem_x509_certificate(response.content).public_key()
        except ValueError:
            raise unauthorized("SigningCertURL does not hold a certificate") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise unauthorized("the signing certificate's key is not RSA")
        if len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[url] = key
    return cache[url]


async def verify(incoming: Incoming, message: dict) -> None:
    if message.get("Type") not in _SIGNED:
        raise malformed("Type is not Notification, SubscriptionConfirmation or UnsubscribeConfirmation")
    version = message.get("SignatureVersion")
    if version not in _HASHES:
        raise unauthorized("SignatureVersion is not 1 or 2")
    try:
        signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
    except binascii.Error:
        raise unauthorized("Signature is not base64") from None
    signed = string_to_sign(message)
    key = await _certificate_key(incoming, _amazon_url(incoming, message.get("SigningCertURL"), "SigningCertURL"))
    try:
        key.verify(signature, signed, padding.PKCS1v15(), _HASHES[version]())
    except InvalidSignature:
        raise unauthorized("the signature does not match") from None
    topics = incoming.settings.ses_topic_arns
    if topics and message.get("TopicArn") not in {t.strip() for t in topics.split(",")}:
        raise Rejected(403, "this topic is not among [webhooks] ses_topic_arns")


async def events(incoming: Incoming) -> list[Event]:
    message = parse_json(incoming.body, dict)
    await verify(incoming, message)
    if message["Type"] == "SubscriptionConfirmation":
        url = _amazon_url(incoming, message.get("SubscribeURL"), "SubscribeURL")
        await _fetch(incoming, url, "SubscribeURL")
        return []
    if message["Type"] == "UnsubscribeConfirmation":
        return []
    try:
        ses = json.loads(message["Message"])
    except (ValueError, RecursionError):
        raise malformed("the Message is not an SES event (JSON)") from None
    if not isinstance(ses, dict):
        raise malformed("the Message is not an SES event (JSON object)")
    kind_name = ses.get("notificationType") or ses.get("eventType")
    mail = ses.get("mail") if isinstance(ses.get("mail"), dict) else {}
    issue = issue_of(header_value(mail.get("headers"), "X-Newsletter-Message-Id"))
    if kind_name == "Bounce":
        bounce = ses.get("bounce")
        if not isinstance(bounce, dict) or not isinstance(bounce.get("bouncedRecipients"), list):
            raise malformed("a Bounce without bounce.bouncedRecipients")
        kind = HARD_BOUNCE if bounce.get("bounceType") == "Permanent" else SOFT_BOUNCE
        name = bounce.get("feedbackId") or message["MessageId"]
        found = []
        for r in bounce["bouncedRecipients"]:
            if not isinstance(r, dict):
                raise malformed("a bounced recipient is not an object")
            email = address(r.get("emailAddress"), "bouncedRecipients.emailAddress")
            reason = " ".join(str(x) for x in (bounce.get("bounceType"), bounce.get("bounceSubType"),
                                               r.get("diagnosticCode") or r.get("status")) if x)
            this = kind
            if kind == HARD_BOUNCE and bounce.get("bounceSubType") == "General" and r.get("diagnosticCode"):
                # the receiving server's reply, judged as the bounce mailbox judges a DSN: a refusal
                # of the sender or the server (relay denied, a block list) is not the reader's
                this = bounce_kind(str(r.get("status") or ""), str(r.get("diagnosticCode")))
                if this is None:
                    log.warning("ses webhook: a permanent bounce that is not the reader's fault, nobody "
                                "suppressed (check the sending settings): %s", reason)
                    continue
            found.append(Event(this, email, SOURCE, reason, f"{name}:{email.lower()}", issue))
        return found
    if kind_name == "Complaint":
        complaint = ses.get("complaint")
        if not isinstance(complaint, dict) or not isinstance(complaint.get("complainedRecipients"), list):
            raise malformed("a Complaint without complaint.complainedRecipients")
        name = complaint.get("feedbackId") or message["MessageId"]
        reason = f"complaint {complaint.get('complaintFeedbackType') or ''}".strip()
        return [Event(COMPLAINT, email, SOURCE, reason, f"{name}:{email.lower()}", issue)
                for email in (address(r.get("emailAddress") if isinstance(r, dict) else None,
                                      "complainedRecipients.emailAddress")
                              for r in complaint["complainedRecipients"])]
    if not isinstance(kind_name, str):
        raise malformed("the SES event has no notificationType or eventType")
    return []  # Delivery, Send, Open, Click...
