"""Postmark: ``POST /email/batch`` with up to 500 messages, each answered on its own.

Reference: https://postmarkapp.com/developer/user-guide/send-email-with-api/batch-emails
and https://postmarkapp.com/developer/api/email-api (500 messages and 50 MB a request).
Auth: ``X-Postmark-Server-Token``. Each message is complete (its own HtmlBody and
TextBody with the recipient's unsubscribe link, its own Headers). Newsletters must go
through a Broadcast stream (``message_stream``). Note: on a stream where Postmark manages
unsubscribes it replaces List-Unsubscribe with its own; ask Postmark to let the stream
"manage unsubscribes on your own" so that ours (signed, RFC 8058) reach the reader.
Answer: HTTP 200 with one ``{"ErrorCode", "Message", "MessageID", "To"}`` a message:
ErrorCode 0 is accepted; 406 is an inactive (suppressed) recipient, which we suppress
too. A whole-request error is 422 ``{"ErrorCode", "Message"}``.
"""

from __future__ import annotations

import httpx

from ..message import Message
from .base import FAILED, SENT, Outcome
from .http import ApiRequest, HttpBackend, json_object

INACTIVE_RECIPIENT = 406


class Backend(HttpBackend):
    name = "postmark"
    title = "Postmark"

    def auth(self) -> dict[str, str]:
        return {"X-Postmark-Server-Token": self.settings.api_key or "", "Accept": "application/json"}

    def build(self, messages: list[Message]) -> ApiRequest:
        factory = messages[0].factory
        stream = self.settings.extra.get("message_stream") or "broadcast"
        batch = []
        for m in messages:
            fields = {
                "From": factory.display_from,
                "To": m.display_to,
                "Subject": m.subject,
                "Headers": [{"Name": k, "Value": v} for k, v in m.headers().items()],
                "MessageStream": stream,
                "TrackOpens": False,
                "TrackLinks": "None",
                "Metadata": {"message_id": m.message_id.strip("<>")},
            }
            if factory.reply_to:
                fields["ReplyTo"] = factory.reply_to
            # The bodies go in already encoded: see Message.html_json.
            batch.append(json_object(fields, {"HtmlBody": m.html_json, "TextBody": m.text_json}))
        return ApiRequest.json_array("/email/batch", batch, {})

    def results(self, response: httpx.Response, messages: list[Message]) -> list[Outcome]:
        try:
            answers = response.json()
        except ValueError:
            answers = None
        if not isinstance(answers, list) or len(answers) != len(messages):
            # Accepted, but an answer we cannot match to messages: say so, do not guess.
            return [Outcome(SENT, f"{response.status_code}, but an unexpected answer: {response.text[:200]}")
                    ] * len(messages)
        outcomes = []
        for answer in answers:
            code = answer.get("ErrorCode")
            text = f"Postmark {code}: {answer.get('Message', '')}".strip()
            if code == 0:
                outcomes.append(Outcome(SENT, f"{text} {answer.get('MessageID', '')}".strip()))
            else:
                outcomes.append(Outcome(FAILED, text, suppress=code == INACTIVE_RECIPIENT))
        return outcomes
