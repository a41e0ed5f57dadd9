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
"""

from __future__ import annotations

import hashlib
import secrets

import httpx

from ..message import Message
from .base import FAILED, SENT, Outcome
from .http import RETRY, ApiRequest, HttpBackend, json_body, json_object


class Backend(HttpBackend):
    name = "resend"
    title = "Resend"

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

    def verdict(self, response: httpx.Response) -> str:
        # 409 concurrent_idempotent_requests: the first request with this key is still
        # running; asking again later returns its answer.
        if response.status_code == 409 and "concurrent" in response.text:
            return RETRY
        return super().verdict(response)

    def results(self, response: httpx.Response, messages: list[Message]) -> list[Outcome]:
        body = json_body(response)
        errors = {e.get("index"): e.get("message", "") for e in _list(body.get("errors")) if isinstance(e, dict)}
        created = iter(item if isinstance(item, dict) else {} for item in _list(body.get("data")))
        outcomes = []
        for index in range(len(messages)):
            if index in errors:
                outcomes.append(Outcome(FAILED, f"Resend: {errors[index]}"))
            else:
                item = next(created, {}) or {}
                outcomes.append(Outcome(SENT, f"{response.status_code} {item.get('id', 'accepted')}"))
        return outcomes


def _list(value) -> list:
    return value if isinstance(value, list) else []
