"""SendGrid: ``POST /v3/mail/send`` with up to 1,000 personalizations a request.

Reference: https://www.twilio.com/docs/sendgrid/api-reference/mail-send and its
limitations page (1,000 personalizations and 1,000 recipients a request, under 30 MB).
Auth: ``Authorization: Bearer <key>``. The content is shared by the whole request, so the
unsubscribe URL goes in as legacy substitution tags (``-unsub_text-``, ``-unsub_html-``:
the HTML one escaped), and each personalization carries its own List-Unsubscribe and
List-Unsubscribe-Post headers. Merge fields go in the same way (``-m0t_<nonce>-`` in the
text, ``-m0h_<nonce>-`` in the HTML: a random nonce per issue, so that no subscriber's
value can spell another tag), and a subject with merge fields as each personalization's
own ``subject``. Subscription and click tracking are turned off, or
SendGrid would add its own List-Unsubscribe and rewrite the links.
Answer: 202 with an empty body for the whole request; no per-recipient results (bounces
come later, by webhook).

One transactional message (``build_single``, a sign-up confirmation): the same endpoint with
one personalization, its own content, no List-Unsubscribe, and all tracking off (subscription
tracking would add an unsubscribe footer to a message that is not a newsletter). Errors: ``{"errors": [{"message": ..., "field": ...}]}``.

Errors (https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/responses
and .../errors; Twilio error 60222): 401 "requires authentication" -> the sender (the key);
403 "From address doesn't match Verified Sender Identity" or "temporarily blocked from
sending due to repeated bad requests" -> the sender: the run stops; 413 "payload too
large" -> the message; 400 whose ``field`` is one personalization's address
(``personalizations.3.to.0.email``) -> that recipient, the others go again at once; any
other 400 -> the message; 429 -> retried when X-RateLimit-Reset says; 5xx -> uncertain
(no idempotency key: never sent again by itself).
"""

from __future__ import annotations

import html
import json
import re
import secrets
import time
from json.encoder import encode_basestring as js  # a JSON string literal, in C

import httpx

from ..checks import one_line_problem
from ..message import Message, MessageFactory
from ..render import PLACEHOLDERS
from ..outcome import MESSAGE, RECIPIENT
from .base import SENT, Outcome
from .http import ApiRequest, HttpBackend, json_body

TEXT_TAG, HTML_TAG = "-unsub_text-", "-unsub_html-"
_ONE_ADDRESS = re.compile(r"personalizations\.(\d+)\.(?:to|cc|bcc)\b")


class Backend(HttpBackend):
    name = "sendgrid"
    title = "SendGrid"
    _shared: tuple[MessageFactory, str, list[tuple[str, str]]] | None = None

    def build(self, messages: list[Message]) -> ApiRequest:
        # The content, the same for the whole request, is JSON-encoded once per issue; each
        # personalization is written straight as JSON, a third of what json.dumps of dicts costs.
        shared = self._shared_json(messages[0].factory)
        tags = self._shared[2]
        people = ",".join(_personalization(m, tags) for m in messages)
        return ApiRequest("POST", "/v3/mail/send", content=f'{{"personalizations":[{people}],{shared}'.encode("utf-8"),
                          headers={"Content-Type": "application/json"})

    def _shared_json(self, factory: MessageFactory) -> str:
        """The members after personalizations, without the opening brace."""
        if self._shared is None or self._shared[0] is not factory:
            placeholder = PLACEHOLDERS["unsubscribe_url"]
            text = factory.rendered.text.replace(placeholder, TEXT_TAG)
            html_body = factory.rendered.html.replace(placeholder, HTML_TAG)
            nonce = secrets.token_hex(4)
            tags = [(f"-m{i}t_{nonce}-", f"-m{i}h_{nonce}-") for i in range(len(factory.merges))]
            for merge_placeholder, (text_tag, html_tag) in zip(factory.holes.placeholders[1:], tags):
                text = text.replace(merge_placeholder, text_tag)
                html_body = html_body.replace(merge_placeholder, html_tag)
            body = {
                # never the bounce address: SendGrid takes no envelope sender, and VERP's {token} is not filled in
                "from": {"email": factory.from_email, "name": factory.sender_name},
                # with merge fields, each personalization has its own; this one is never seen
                "subject": factory.fallback_subject,
                "content": [
                    {"type": "text/plain", "value": text},
                    {"type": "text/html", "value": html_body},
                ],
                "tracking_settings": {"subscription_tracking": {"enable": False},
                                      "click_tracking": {"enable": False, "enable_text": False}},
            }
            if factory.reply_to:
                body["reply_to"] = {"email": factory.reply_to}
            self._shared = (factory, json.dumps(body, ensure_ascii=False, separators=(",", ":"))[1:], tags)
        return self._shared[1]

    def build_single(self, message) -> ApiRequest:
        to = {"email": message.recipient}
        if _name_ok(message.name):
            to["name"] = message.name
        sender = {"email": message.sender}
        if _name_ok(message.sender_name):
            sender["name"] = message.sender_name
        body = {
            "personalizations": [{"to": [to]}],
            "from": sender,
            "subject": message.subject,
            "content": [{"type": "text/plain", "value": message.text}, {"type": "text/html", "value": message.html}],
            "headers": message.headers(),
            "custom_args": {"message_id": message.message_id.strip("<>")},
            "tracking_settings": {"subscription_tracking": {"enable": False}, "open_tracking": {"enable": False},
                                  "click_tracking": {"enable": False, "enable_text": False}},
        }
        if message.reply_to:
            body["reply_to"] = {"email": message.reply_to}
        return ApiRequest("POST", "/v3/mail/send", json=body)

    def single_results(self, response: httpx.Response, messages: list) -> list[Outcome]:
        return self.results(response, messages)

    def retry_after(self, response: httpx.Response) -> float | None:
        # SendGrid's 429 says when its window resets (X-RateLimit-Reset, Unix time), not Retry-After.
        reset = response.headers.get("x-ratelimit-reset")
        if reset is not None and response.headers.get("retry-after") is None:
            try:
                return max(0.0, float(reset) - time.time())
            except ValueError:
                return None
        return super().retry_after(response)

    def refusal(self, response: httpx.Response, messages: list[Message]) -> tuple[Outcome, int | None]:
        status = response.status_code
        if status == 413:
            return self.refused(MESSAGE, status, self.error_text(response)), None
        if status == 400:  # one personalization (one message each) named by its field: that recipient
            errors = json_body(response).get("errors")
            found = {int(m[1]) for e in (errors if isinstance(errors, list) else []) if isinstance(e, dict)
                     if (m := _ONE_ADDRESS.match(str(e.get("field") or "")))}
            if len(found) == 1 and (index := found.pop()) < len(messages):
                return self.refused(RECIPIENT, status, self.error_text(response)), index
        return super().refusal(response, messages)

    def results(self, response: httpx.Response, messages: list[Message]) -> list[Outcome]:
        batch = response.headers.get("x-message-id", "")
        return [Outcome(SENT, f"{response.status_code} accepted" + (f" (X-Message-Id {batch})" if batch else ""))
                ] * len(messages)


def _name_ok(name: str | None) -> bool:
    # SendGrid refuses , and ; in names; a name that is not one line is left out, as for every backend
    return bool(name) and not any(c in name for c in ",;") and not one_line_problem(name)


def _personalization(message: Message, tags: list[tuple[str, str]]) -> str:
    """{"to": [{"email", "name"}], "headers", "substitutions", "custom_args"} (and "subject",
    if it has merge fields) as JSON."""
    to = f'"email":{js(message.recipient)}'
    # SendGrid refuses , and ; in names; a name that is not one line is left out, as for every backend
    if message.name and not any(c in message.name for c in ",;") and not one_line_problem(message.name):
        to += f',"name":{js(message.name)}'
    headers = ",".join(f"{js(name)}:{js(value)}" for name, value in message.headers().items())
    url = message.unsubscribe_url
    merged = "".join(f',"{t}":{js(v)},"{h}":{js(html.escape(v, quote=True))}'
                     for (t, h), v in zip(tags, message.merge_values))
    subject = f'"subject":{js(message.subject)},' if message.factory.subject_merged else ""
    return (f'{{"to":[{{{to}}}],{subject}"headers":{{{headers}}},'
            f'"substitutions":{{"{TEXT_TAG}":{js(url)},"{HTML_TAG}":{js(html.escape(url, quote=True))}{merged}}},'
            f'"custom_args":{{"message_id":{js(message.message_id.strip("<>"))}}}}}')
