"""SendGrid: ``POST /v3/mail/send`` with up to 1,000 personalizations a request.

Reference: https://www.twilio.com/docs/sendgrid/api-reference/mail-send and its
limitations page (1,000 personalizations and 1,000 recipients a request, under 30 MB).
Auth: ``Authorization: Bearer <key>``. The content is shared by the whole request, so the
unsubscribe URL goes in as legacy substitution tags (``-unsub_text-``, ``-unsub_html-``:
the HTML one escaped), and each personalization carries its own List-Unsubscribe and
List-Unsubscribe-Post headers. Subscription and click tracking are turned off, or
SendGrid would add its own List-Unsubscribe and rewrite the links.
Answer: 202 with an empty body for the whole request; no per-recipient results (bounces
come later, by webhook). Errors: ``{"errors": [{"message": ..., "field": ...}]}``.
"""

from __future__ import annotations

import html
import time

import httpx

from ..message import Message
from ..render import PLACEHOLDERS
from .base import SENT, Outcome
from .http import ApiRequest, HttpBackend

TEXT_TAG, HTML_TAG = "-unsub_text-", "-unsub_html-"


class Backend(HttpBackend):
    name = "sendgrid"
    title = "SendGrid"

    def build(self, messages: list[Message]) -> ApiRequest:
        factory = messages[0].factory
        placeholder = PLACEHOLDERS["unsubscribe_url"]
        body = {
            "from": {"email": factory.envelope_sender, "name": factory.sender_name},
            "subject": factory.subject,
            "content": [
                {"type": "text/plain", "value": factory.rendered.text.replace(placeholder, TEXT_TAG)},
                {"type": "text/html", "value": factory.rendered.html.replace(placeholder, HTML_TAG)},
            ],
            "personalizations": [_personalization(m) for m in messages],
            "tracking_settings": {"subscription_tracking": {"enable": False},
                                  "click_tracking": {"enable": False, "enable_text": False}},
        }
        if factory.reply_to:
            body["reply_to"] = {"email": factory.reply_to}
        return ApiRequest("POST", "/v3/mail/send", json=body)

    def retry_after(self, response: httpx.Response) -> float | None:
        # SendGrid's 429 says when its window resets (X-RateLimit-Reset, Unix time), not Retry-After.
        reset = response.headers.get("x-ratelimit-reset")
        if reset is not None and response.headers.get("retry-after") is None:
            try:
                return max(0.0, float(reset) - time.time())
            except ValueError:
                return None
        return super().retry_after(response)

    def results(self, response: httpx.Response, messages: list[Message]) -> list[Outcome]:
        batch = response.headers.get("x-message-id", "")
        return [Outcome(SENT, f"{response.status_code} accepted" + (f" (X-Message-Id {batch})" if batch else ""))
                ] * len(messages)


def _personalization(message: Message) -> dict:
    to = {"email": message.recipient}
    if message.name and not any(c in message.name for c in ",;\r\n"):  # SendGrid refuses , and ; in names
        to["name"] = message.name
    return {
        "to": [to],
        "headers": message.headers(),
        "substitutions": {TEXT_TAG: message.unsubscribe_url,
                          HTML_TAG: html.escape(message.unsubscribe_url, quote=True)},
        "custom_args": {"message_id": message.message_id.strip("<>")},
    }
