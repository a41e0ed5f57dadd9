"""Mailgun's webhooks.

How Mailgun signs them ("Securing Webhooks",
https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks):
the JSON body carries `signature: {timestamp, token, signature}`; the signature is the hex
HMAC-SHA256 of timestamp and token concatenated, keyed with the account's HTTP webhook
signing key. Mailgun advises caching tokens to refuse their reuse and refusing old
timestamps: both are done here ([webhooks] max_age; tokens are kept for that long).

Events (`event-data`, "Events" reference): failed with severity permanent (hard) or
temporary (soft), complained, unsubscribed; each has an `id`. Our Message-Id comes back in
message.headers.message-id, and in user-variables when set.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time

from ...outcome import COMPLAINT, HARD_BOUNCE, RCPT, RECIPIENT, SOFT_BOUNCE, UNSUBSCRIBE, Event, smtp_outcome
from . import Incoming, address, issue_of, malformed, parse_json, text, unauthorized

NAME = "mailgun"
SOURCE = "mailgun webhook"


def configured(settings) -> bool:
    return bool(settings.mailgun_signing_key)


def verify(incoming: Incoming, body: dict) -> str:
    """The request's token, once its signature, age and novelty are checked."""
    signed = body.get("signature")
    if not isinstance(signed, dict):
        raise unauthorized("no signature object")
    timestamp, token, signature = (str(signed.get(k, "")) for k in ("timestamp", "token", "signature"))
    if not (timestamp and token and signature):
        raise unauthorized("the signature object lacks timestamp, token or signature")
    # Unix seconds, digits only: the HMAC covers timestamp + token run together, so a
    # timestamp that may end in "e0" (or "_0", ".0") would let a captured signature be split
    # another way, as a new token that the replay cache has never seen.
    if not re.fullmatch(r"[0-9]{1,12}", timestamp):
        raise unauthorized("the timestamp is not a number of seconds")
    expected = hmac.new(incoming.settings.mailgun_signing_key.encode(), (timestamp + token).encode(),
                        hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.lower().encode("utf-8", "replace")):
        raise unauthorized("the signature does not match")
    try:
        age = time.time() - float(timestamp)
    except ValueError:
        raise unauthorized("the timestamp is not a number") from None
    max_age = incoming.settings.max_age
    if abs(age) > max_age:
        raise unauthorized(f"the timestamp is {age:.0f} s old (at most {max_age:.0f} s taken)")
    tokens: dict[str, float] = incoming.state.setdefault("tokens", {})
    now = time.time()
    if len(tokens) > 10_000:  # forget what has aged out anyway
        for old in [t for t, seen in tokens.items() if now - seen > max_age]:
            del tokens[old]
    if token in tokens and now - tokens[token] <= max_age:
        raise unauthorized("this token was used before (a replayed request)")
    tokens[token] = now
    return token


def forget(incoming: Incoming, token: str) -> None:
    """The request was not taken after all (the store failed): Mailgun's retry may use the token."""
    incoming.state.get("tokens", {}).pop(token, None)


async def events(incoming: Incoming) -> list[Event]:
    body = parse_json(incoming.body, dict)
    incoming.token = verify(incoming, body)
    data = body.get("event-data")
    if not isinstance(data, dict):
        raise malformed("no event-data object")
    event = data.get("event")
    if event == "failed":
        severity = data.get("severity")
        kind = HARD_BOUNCE if severity == "permanent" else SOFT_BOUNCE
        status = data.get("delivery-status") if isinstance(data.get("delivery-status"), dict) else {}
        words = " ".join(str(status[k]) for k in ("code", "message", "description") if status.get(k))
        reason = f"{severity or 'failed'}: {words or data.get('reason', '')}".rstrip(": ")
        code = status.get("code")
        if kind == HARD_BOUNCE and isinstance(code, int) and 500 <= code < 600:
            # The receiving server's own reply: judged as every other door judges one (as at
            # RCPT); a refusal of the sender, the message or the server is not the reader's.
            said = " ".join(str(status[k]) for k in ("message", "description") if status.get(k))
            outcome = smtp_outcome(code, said, RCPT)
            if not outcome.suppress:
                if outcome.fault != RECIPIENT:  # nobody's standing changes: the sending needs fixing
                    logging.getLogger("newsletter.webhooks").warning(
                        "mailgun webhook: a permanent failure that is not the reader's fault, nobody suppressed "
                        "(check the sending settings): %s", outcome.reply)
                    return []
                kind = SOFT_BOUNCE
    elif event == "complained":
        kind, reason = COMPLAINT, "complained"
    elif event == "unsubscribed":
        kind, reason = UNSUBSCRIBE, "unsubscribed"
    else:
        return []  # accepted, delivered, opened, clicked...
    message = data.get("message") if isinstance(data.get("message"), dict) else {}
    headers = message.get("headers") if isinstance(message.get("headers"), dict) else {}
    variables = data.get("user-variables") if isinstance(data.get("user-variables"), dict) else {}
    issue = issue_of(headers.get("message-id")) or issue_of(variables.get("message_id"))
    return [Event(kind, address(data.get("recipient")), SOURCE, reason, text(data.get("id"), "event-data.id"), issue)]
