"""Mailgun: ``POST /v3/{domain}/messages`` with up to 1,000 recipients and
``recipient-variables``, so that each gets a copy of their own.

Reference: https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/batch-sending
and the Messages API (form fields ``from``, ``to`` repeated, ``subject``, ``text``,
``html``, ``h:<Header>``, ``o:<option>``, ``recipient-variables``). Auth: HTTP Basic,
user ``api``, password the key. ``base_url`` is https://api.mailgun.net, or
https://api.eu.mailgun.net for an EU domain. ``%recipient.x%`` is replaced per recipient in
the bodies and in ``h:`` headers, which carries each one's List-Unsubscribe and
Message-Id. Answer: 200 ``{"id": ..., "message": "Queued. Thank you."}`` for the whole
batch; errors ``{"message": ...}``.
"""

from __future__ import annotations

import html
import json

import httpx

from ..errors import SendError
from ..message import Message
from ..render import PLACEHOLDERS
from .base import SENT, Outcome
from .http import STOP, ApiRequest, HttpBackend, json_body


class Backend(HttpBackend):
    name = "mailgun"
    title = "Mailgun"

    def auth(self) -> httpx.Auth:
        return httpx.BasicAuth("api", self.settings.api_key or "")

    async def open_worker(self):
        if not self.settings.extra.get("domain"):  # before anything is marked as sending
            raise SendError("mailgun: [mailgun] domain is not set (your sending domain, e.g. mg.example.com)")
        return await super().open_worker()

    def build(self, messages: list[Message]) -> ApiRequest:
        domain = self.settings.extra["domain"]
        factory = messages[0].factory
        placeholder = PLACEHOLDERS["unsubscribe_url"]
        fields = {
            "from": factory.display_from,
            "to": [m.display_to for m in messages],
            "subject": factory.subject,
            "text": factory.rendered.text.replace(placeholder, "%recipient.unsubscribe_text%"),
            "html": factory.rendered.html.replace(placeholder, "%recipient.unsubscribe_html%"),
            "h:List-Unsubscribe": "%recipient.list_unsubscribe%",
            "h:List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "h:List-Id": factory.list_id,
            "h:Message-Id": "%recipient.message_id%",
            "o:tracking-clicks": "no",
        }
        if factory.reply_to:
            fields["h:Reply-To"] = factory.reply_to
        variables = {m.recipient: {
            "unsubscribe_text": m.unsubscribe_url,
            "unsubscribe_html": html.escape(m.unsubscribe_url, quote=True),
            "list_unsubscribe": m.list_unsubscribe,
            "message_id": m.message_id,
        } for m in messages}
        fields["recipient-variables"] = json.dumps(variables, separators=(",", ":"))
        return ApiRequest("POST", f"/v3/{domain}/messages", data=fields)

    def verdict(self, response: httpx.Response) -> str:
        # 404: no such domain here (a typo, or a domain of the other region): settings.
        return STOP if response.status_code == 404 else super().verdict(response)

    def results(self, response: httpx.Response, messages: list[Message]) -> list[Outcome]:
        body = json_body(response)
        detail = f"{response.status_code} {body.get('message', 'accepted')} {body.get('id', '')}".strip()
        return [Outcome(SENT, detail)] * len(messages)
