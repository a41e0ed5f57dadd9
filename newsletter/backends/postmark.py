"""Postmark: ``POST /email/batch`` with up to 500 messages, each answered on its own.

Reference: https://postmarkapp.com/developer/user-guide/send-email-with-api/batch-emails
and https://postmarkapp.com/developer/api/email-api (500 messages and 50 MB a request).
Auth: ``X-Postmark-Server-Token``. Each message is complete (its own HtmlBody and
TextBody with the recipient's unsubscribe link, its own Headers). Newsletters must go
through a Broadcast stream (``message_stream``). Note: on a stream where Postmark manages
unsubscribes it replaces List-Unsubscribe with its own; ask Postmark to let the stream
"manage unsubscribes on your own" so that ours (signed, RFC 8058) reach the reader.
Answer: HTTP 200 with one ``{"ErrorCode", "Message", "MessageID", "To"}`` a message:
ErrorCode 0 is accepted. A whole-request error is 422 ``{"ErrorCode", "Message"}``; a bad
token is 401 (ErrorCode 10).

ErrorCodes (https://postmarkapp.com/developer/api/overview#error-codes, and the support
articles "What does Error Code 300 mean" and "Troubleshooting 422 errors"), per message or
for the whole request alike:
    406 inactive recipient (hard bounce or spam complaint) -> the recipient: failed, suppressed
    300 invalid email request: by its words: the 'From' address or "not a verified sender
        signature" -> the sender; the 'To' address -> that recipient (failed, not suppressed:
        Postmark's address rules are stricter than ours); else (no body, over 50 recipients)
        -> the message
    10 bad token, 400 sender signature not found, 401 sender signature not confirmed, 405 not
        allowed to send, 412 account pending, 413 account may not send, 1235/1236 message
        stream not found or not usable here -> the sender: the run stops
    402 invalid JSON, 403 incompatible JSON, 409 JSON required, 410 too many batch messages,
        411 forbidden attachment -> the message: the run stops
    any other code -> failed, nobody's fault we know of (never suppressed; --retry-failed)
HTTP 429 is retried; 5xx is uncertain (no idempotency key).

One transactional message (``build_single``, a sign-up confirmation) goes to ``POST /email``
on the transactional stream (``transactional_stream``, by default ``outbound``: a Broadcast
stream is for newsletters); it answers 200 ``{"ErrorCode": 0, "MessageID"}``, and its errors
are the same 422 ErrorCodes, read by the same ``refusal``.
"""

from __future__ import annotations

import httpx

from ..message import Message
from ..outcome import MESSAGE, RECIPIENT, SENDER, SERVER
from .base import FAILED, SENT, Outcome
from .http import ApiRequest, HttpBackend, json_body, json_object

INACTIVE_RECIPIENT, INVALID_REQUEST = 406, 300
SENDER_CODES = {10, 400, 401, 405, 412, 413, 1235, 1236}
MESSAGE_CODES = {402, 403, 409, 410, 411}


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

    def build_single(self, message) -> ApiRequest:
        fields = {
            "From": message.display_from,
            "To": message.display_to,
            "Subject": message.subject,
            "TextBody": message.text,
            "HtmlBody": message.html,
            "Headers": [{"Name": k, "Value": v} for k, v in message.headers().items()],
            "MessageStream": self.settings.extra.get("transactional_stream") or "outbound",
            "TrackOpens": False,
            "TrackLinks": "None",
            "Metadata": {"message_id": message.message_id.strip("<>")},
        }
        if message.reply_to:
            fields["ReplyTo"] = message.reply_to
        return ApiRequest("POST", "/email", json=fields)

    def single_results(self, response: httpx.Response, messages: list) -> list[Outcome]:
        body = json_body(response)
        code = body.get("ErrorCode", 0)
        if code:  # not expected with a 200, but Postmark's word is in ErrorCode
            text = str(body.get("Message", ""))
            fault = _fault(code, text, messages[0].recipient)
            return [self.refused(fault, response.status_code, text, code=f"Postmark {code}",
                                 suppress=fault == RECIPIENT and code == INACTIVE_RECIPIENT)]
        return [Outcome(SENT, f"{response.status_code} MessageID {body.get('MessageID', '')}".strip())]

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
        for answer, message in zip(answers, messages):
            code = answer.get("ErrorCode") if isinstance(answer, dict) else None
            if code == 0:
                outcomes.append(Outcome(SENT, f"Postmark 0: {answer.get('Message', '')} {answer.get('MessageID', '')}"))
            else:
                text = answer.get("Message", "") if isinstance(answer, dict) else str(answer)
                outcomes.append(Outcome(FAILED, f"Postmark {code}: {text}", _fault(code, text, message.recipient),
                                        suppress=code == INACTIVE_RECIPIENT, code=f"Postmark {code}"))
        return outcomes

    def refusal(self, response: httpx.Response, messages: list[Message]) -> tuple[Outcome, int | None]:
        status, code = response.status_code, json_body(response).get("ErrorCode")
        if status != 422 or not isinstance(code, int):
            return super().refusal(response, messages)
        text = self.error_text(response)
        index = self.named_recipient(text, messages)
        fault = _fault(code, text, messages[index].recipient if index is not None else "")
        if fault == RECIPIENT and index is None:  # a recipient's error that names none of ours: suppress nobody
            fault = SERVER
        outcome = self.refused(fault, status, text, code=f"Postmark {code}",
                               suppress=fault == RECIPIENT and code == INACTIVE_RECIPIENT)
        return outcome, index if fault == RECIPIENT else None


def _fault(code, text: str, recipient: str) -> str:
    if code == INACTIVE_RECIPIENT:
        return RECIPIENT
    if code in SENDER_CODES:
        return SENDER
    if code == INVALID_REQUEST:
        lowered = text.lower()
        if "'from'" in lowered or "sender signature" in lowered:
            return SENDER
        if recipient and recipient.lower() in lowered:
            return RECIPIENT
        return MESSAGE
    return MESSAGE if code in MESSAGE_CODES else SERVER
