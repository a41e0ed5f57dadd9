"""Resend: ``POST /emails/batch`` with up to 100 emails, and an Idempotency-Key.

Reference: https://resend.com/docs/api-reference/emails/send-batch-emails,
https://resend.com/docs/dashboard/emails/idempotency-keys (a key is kept 24 hours; the
same key and payload return the first answer without sending again) and
https://resend.com/docs/dashboard/emails/batch-validation-modes. Auth: ``Authorization:
Bearer re_...``. Default rate limit: 2 requests a second (``requests_per_second``); 429
comes with ``retry-after``. The key is derived from the issue and the batch's messages,
so a retried request, or the same batch after a crash, cannot send twice. With
``x-batch-validation: permissive`` one bad email does not stop the rest: the answer's
``errors`` list names it by index. Answer: 200 ``{"data": [{"id"}...], "errors": [...]}``;
errors ``{"statusCode", "message", "name"}``.

Retries: thanks to the key, a timeout, a lost connection, a 5xx and 409
``concurrent_idempotent_requests`` ("the original request is still in progress") are all
retried with the same key and body; out of tries, the batch is deferred and goes again
under the same key. Errors (https://resend.com/docs/api-reference/errors and the
knowledge-base page "403 error domain mismatch"):
    401 missing_api_key / restricted_api_key, 403 invalid_api_key, 403 validation_error
        ("The example.com domain is not verified", "You can only send testing emails to
        your own email address") -> the sender: the run stops
    422 invalid_from_address, or validation_error naming `from` -> the sender
    429 daily_quota_exceeded / monthly_quota_exceeded -> the sender (retrying cannot help);
        429 rate_limit_exceeded -> retried after retry-after
    400/422 naming one of the batch's addresses -> that recipient, the others go again;
        any other 4xx (invalid_idempotent_request, invalid_idempotency_key, ...) -> the message
    permissive ``errors[]`` by index: naming `from` or an unverified domain -> the sender;
        naming `to` or the address -> that recipient, failed and suppressed only when it says
        the address does not exist or is on Resend's suppression list; else -> the message

One transactional message (``build_single``, a sign-up confirmation) goes to ``POST /emails``
under an Idempotency-Key of its own (``signup/<its Message-ID>``), so its retries are as safe
as a batch's; it answers 200 ``{"id"}``.
"""

from __future__ import annotations

import hashlib
import secrets

import httpx

from ..message import Message
import re

from ..outcome import MESSAGE, RECIPIENT, SENDER, SERVER
from .base import DEFERRED, FAILED, SENT, Outcome
from .http import ApiRequest, HttpBackend, json_body, json_object

_SENDER = re.compile(r"`from`|domain is not verified|verify your domain|testing emails", re.I)
_GONE = re.compile(r"does not exist|suppression list|suppressed", re.I)  # the address itself: never again


class Backend(HttpBackend):
    name = "resend"
    title = "Resend"
    idempotent = True

    def build(self, messages: list[Message]) -> ApiRequest:
        factory = messages[0].factory
        emails = []
        for m in messages:
            fields = {
                "from": factory.display_from,
                "to": [m.display_to],
                "subject": m.subject,
                "headers": m.headers(),
            }
            if factory.reply_to:
                fields["reply_to"] = factory.reply_to
            # The bodies go in already encoded: see Message.html_json.
            emails.append(json_object(fields, {"html": m.html_json, "text": m.text_json}))
        ids = hashlib.sha256("\n".join(m.message_id for m in messages).encode()).hexdigest()[:32]
        key = f"{factory.id_prefix}/{ids}"
        if factory.test_send:  # a proof sent again must go again, not be answered from the key
            key += f"/{secrets.token_hex(4)}"
        return ApiRequest.json_array("/emails/batch", emails,
                                     {"Idempotency-Key": key, "x-batch-validation": "permissive"})

    def build_single(self, message) -> ApiRequest:
        fields = {"from": message.display_from, "to": [message.display_to], "subject": message.subject,
                  "text": message.text, "html": message.html, "headers": message.headers()}
        if message.reply_to:
            fields["reply_to"] = message.reply_to
        # unique to this confirmation (its Message-ID): a retry is answered, never sent twice
        key = f"signup/{message.message_id.strip('<>')}"[:256]
        return ApiRequest("POST", "/emails", json=fields, headers={"Idempotency-Key": key})

    def single_results(self, response: httpx.Response, messages: list) -> list[Outcome]:
        return [Outcome(SENT, f"{response.status_code} {json_body(response).get('id', 'accepted')}")]

    def refusal(self, response: httpx.Response, messages: list[Message]) -> tuple[Outcome, int | None]:
        status, name = response.status_code, str(json_body(response).get("name", ""))
        text = self.error_text(response)
        code = f"Resend {status} {name}".strip()
        if status == 409 and name == "concurrent_idempotent_requests":
            # the first request with this key is still running; asking again later returns its answer
            return Outcome(DEFERRED, self.reply(status, text), SERVER, code=code), None
        if status == 429 and "quota" in name:
            return self.refused(SENDER, status, text, code), None
        if status in (400, 422) and (name == "invalid_from_address" or _SENDER.search(text)):
            return self.refused(SENDER, status, text, code), None
        outcome, index = super().refusal(response, messages)
        return (Outcome(outcome.state, outcome.reply, outcome.fault, retry_after=outcome.retry_after, code=code)
                if outcome.state == FAILED else outcome), index

    def results(self, response: httpx.Response, messages: list[Message]) -> list[Outcome]:
        body = json_body(response)
        errors = {e.get("index"): e.get("message", "") for e in _list(body.get("errors")) if isinstance(e, dict)}
        created = iter(item if isinstance(item, dict) else {} for item in _list(body.get("data")))
        outcomes = []
        for index in range(len(messages)):
            if index in errors:
                outcomes.append(_item_error(str(errors[index]), messages[index].recipient))
            else:
                item = next(created, {}) or {}
                outcomes.append(Outcome(SENT, f"{response.status_code} {item.get('id', 'accepted')}"))
        return outcomes


def _item_error(text: str, recipient: str) -> Outcome:
    """One email of a permissive batch refused, in Resend's words."""
    reply = f"Resend: {text}"
    if _SENDER.search(text):
        return Outcome(FAILED, reply, SENDER, code="Resend errors[] from")
    if "`to`" in text or recipient.lower() in text.lower():
        return Outcome(FAILED, reply, RECIPIENT, suppress=bool(_GONE.search(text)), code="Resend errors[] to")
    return Outcome(FAILED, reply, MESSAGE, code="Resend errors[]")


def _list(value) -> list:
    return value if isinstance(value, list) else []
