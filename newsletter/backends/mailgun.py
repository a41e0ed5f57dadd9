"""Mailgun: ``POST /v3/{domain}/messages`` with up to 1,000 recipients and
``recipient-variables``, so that each gets a copy of their own.

Reference: https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/batch-sending
and the Messages API (form fields ``from``, ``to`` repeated, ``subject``, ``text``,
``html``, ``h:<Header>``, ``o:<option>``, ``recipient-variables``). Auth: HTTP Basic,
user ``api``, password the key. ``base_url`` is https://api.mailgun.net, or
https://api.eu.mailgun.net for an EU domain. ``%recipient.x%`` is replaced per recipient in
the bodies, the subject and ``h:`` headers, which carries each one's List-Unsubscribe,
Message-Id and merge fields (``%recipient.m0t_<nonce>%``, raw for the text and the
subject, ``m0h_<nonce>`` escaped for the HTML; a random nonce per issue, so that no
subscriber's value can name another variable). Answer: 200 ``{"id": ..., "message":
"Queued. Thank you."}`` for the whole batch (and for ``build_single``: one transactional
message, a sign-up confirmation, as plain from/to/subject/text/html fields with tracking off); errors ``{"message": ...}`` (a bad key: 401
and a plain "Forbidden").

Errors (https://documentation.mailgun.com/docs/mailgun/quickstart-guide/responses): 400 "a
JSON response with a message key" -> the message (the same request shape would fail every
batch), or the one recipient whose address it names; 401/403 "auth error or access denied"
-> the sender (the key): the run stops; 404 "resource not found", here the sending domain
(a typo, or a domain of the other region) -> the sender (settings): the run stops; 429
"retry as defined in the response" -> retried; 500 "internal error" -> uncertain (Mailgun
has no idempotency key: a retry could send the batch twice). The shared rules are in http.py.
"""

from __future__ import annotations

import html
import json
import secrets

import httpx

from ..errors import SendError
from ..message import Message, MessageFactory
from ..render import PLACEHOLDERS
from .base import SENT, Outcome
from .http import ApiRequest, HttpBackend, json_body


class Backend(HttpBackend):
    name = "mailgun"
    title = "Mailgun"
    _shared: tuple[MessageFactory, "_Form", list[tuple[str, str]]] | None = None

    def auth(self) -> httpx.Auth:
        return httpx.BasicAuth("api", self.settings.api_key or "")

    async def open_worker(self):
        if not self.settings.extra.get("domain"):  # before anything is marked as sending
            raise SendError("mailgun: [mailgun] domain is not set (your sending domain, e.g. mg.example.com)")
        return await super().open_worker()

    def build(self, messages: list[Message]) -> ApiRequest:
        domain = self.settings.extra["domain"]
        factory = messages[0].factory
        form = self._form(factory)
        names = self._shared[2]
        variables = {m.recipient: {
            "unsubscribe_text": m.unsubscribe_url,
            "unsubscribe_html": html.escape(m.unsubscribe_url, quote=True),
            "list_unsubscribe": m.list_unsubscribe,
            "message_id": m.message_id,
            **{k: v for (t, h), value in zip(names, m.merge_values)
               for k, v in ((t, value), (h, html.escape(value, quote=True)))},
        } for m in messages}
        body = form.encode([("to", m.display_to) for m in messages]
                           + [("recipient-variables", json.dumps(variables, separators=(",", ":")))])
        return ApiRequest("POST", f"/v3/{domain}/messages", content=body, headers={"Content-Type": form.content_type})

    def _form(self, factory: MessageFactory) -> "_Form":
        """The fields that every request of this issue shares, encoded once."""
        if self._shared is None or self._shared[0] is not factory:
            placeholder = PLACEHOLDERS["unsubscribe_url"]
            subject = factory.subject
            text = factory.rendered.text.replace(placeholder, "%recipient.unsubscribe_text%")
            html_body = factory.rendered.html.replace(placeholder, "%recipient.unsubscribe_html%")
            nonce = secrets.token_hex(4)
            names = [(f"m{i}t_{nonce}", f"m{i}h_{nonce}") for i in range(len(factory.merges))]
            for merge_placeholder, (t, h) in zip(factory.holes.placeholders[1:], names):
                subject = subject.replace(merge_placeholder, f"%recipient.{t}%")
                text = text.replace(merge_placeholder, f"%recipient.{t}%")
                html_body = html_body.replace(merge_placeholder, f"%recipient.{h}%")
            fields = [
                ("from", factory.display_from),
                ("subject", subject),
                ("text", text),
                ("html", html_body),
                ("h:List-Unsubscribe", "%recipient.list_unsubscribe%"),
                ("h:List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
                ("h:List-Id", factory.list_id),
                ("h:Message-Id", "%recipient.message_id%"),
                ("o:tracking-clicks", "no"),
            ]
            if factory.reply_to:
                fields.append(("h:Reply-To", factory.reply_to))
            self._shared = (factory, _Form(fields), names)
        return self._shared[1]

    def build_single(self, message) -> ApiRequest:
        fields = [("from", message.display_from), ("to", message.display_to), ("subject", message.subject),
                  ("text", message.text), ("html", message.html), ("h:Message-Id", message.message_id),
                  *((f"h:{k}", v) for k, v in message.headers().items()),
                  ("o:tracking", "no"), ("o:tracking-clicks", "no"), ("o:tracking-opens", "no")]
        if message.reply_to:
            fields.append(("h:Reply-To", message.reply_to))
        form = _Form([])
        return ApiRequest("POST", f"/v3/{self.settings.extra['domain']}/messages", content=form.encode(fields),
                          headers={"Content-Type": form.content_type})

    def single_results(self, response: httpx.Response, messages: list) -> list[Outcome]:
        return self.results(response, messages)

    def results(self, response: httpx.Response, messages: list[Message]) -> list[Outcome]:
        body = json_body(response)
        detail = f"{response.status_code} {body.get('message', 'accepted')} {body.get('id', '')}".strip()
        return [Outcome(SENT, detail)] * len(messages)


class _Form:
    """multipart/form-data (RFC 7578) with some fields encoded once: urlencoding the
    HTML and the recipient variables a character at a time cost more than everything
    else, and multipart copies them as they are."""

    def __init__(self, shared: list[tuple[str, str]]):
        self.boundary = secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self.shared = b"".join(self._field(name, value) for name, value in shared)

    def _field(self, name: str, value: str) -> bytes:
        data = value.encode("utf-8")
        if self.boundary.encode("ascii") in data:  # 128 random bits: never, but never unchecked
            raise SendError(f"mailgun: the field {name} holds the form's boundary; send again")
        return (f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode("ascii")
                + data + b"\r\n")

    def encode(self, fields: list[tuple[str, str]]) -> bytes:
        closing = f"--{self.boundary}--\r\n".encode("ascii")
        return b"".join([self.shared, *(self._field(name, value) for name, value in fields), closing])
