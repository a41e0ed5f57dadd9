"""Amazon SES v2: ``SendEmail`` with the whole message as raw MIME, one request each.

Reference: https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_SendEmail.html
(``POST /v2/email/outbound-emails``, body ``{"FromEmailAddress", "Destination":
{"ToAddresses"}, "Content": {"Raw": {"Data": <base64>}}, "ConfigurationSetName"}``).
Raw content keeps our MIME exactly (List-Unsubscribe and List-Unsubscribe-Post
included); SendBulkEmail would need an SES template and gain nothing, since SES counts
quota by recipient. ``ListManagementOptions`` is not set, or SES would add its own
List-Unsubscribe. Requests are signed with AWS Signature Version 4 by botocore (service
``ses``), with credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
AWS_SESSION_TOKEN. ``requests_per_second`` should match the account's MaxSendRate.
Answer: 200 ``{"MessageId"}``; errors carry ``x-amzn-ErrorType`` and ``{"message"}``;
throttling is 429 TooManyRequestsException. Note: SES replaces the Message-ID header.
One transactional message (``build_single``, a sign-up confirmation) is the same SendEmail
with its own raw MIME (its ``data``).

Errors, by x-amzn-ErrorType (https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_SendEmail.html
"Errors", and the knowledge-center article on 400 "Message rejected: Email address is not
verified. The following identities failed the check in region"):
    MessageRejected -> the sender ("Email address is not verified": an unverified From in this
        region, or in the sandbox an unverified recipient, both the account's to fix; moto says
        "Did not have authority to send from"), unless it speaks of the content (a virus, a
        header, a line, the size) -> the message: either way the run stops
    MailFromDomainNotVerifiedException, AccountSuspendedException, SendingPausedException,
        NotFoundException (the configuration set), LimitExceededException, and a 429 that
        speaks of a daily quota -> the sender: the run stops, the rest waits
    403 (UnrecognizedClientException, SignatureDoesNotMatch, AccessDenied...) -> the sender
    BadRequestException and other 4xx -> the message
    TooManyRequestsException (429) -> retried; 5xx -> uncertain (SendEmail takes no
        idempotency token: a retry could send twice)
"""

from __future__ import annotations

import base64
import json
import os
import re

import httpx

from ..errors import SendError
from ..message import Message
from ..outcome import MESSAGE, SENDER
from .base import FAILED, SENT, Outcome
from .http import ApiRequest, HttpBackend, json_body


_CONTENT = re.compile(r"content|virus|header|line|body|attachment|too large|size|MIME", re.I)
SENDER_ERRORS = {"MailFromDomainNotVerifiedException", "AccountSuspendedException", "SendingPausedException",
                 "NotFoundException", "LimitExceededException"}


class Backend(HttpBackend):
    name = "ses"
    title = "Amazon SES"
    needs_key = False  # AWS credentials instead

    def __init__(self, settings):
        super().__init__(settings)
        self.region = settings.extra.get("region") or "us-east-1"
        self._signer = None
        self._tail: bytes | None = None  # the body after the base64, the same for every request

    def base_url(self) -> str:
        return self.settings.base_url or f"https://email.{self.region}.amazonaws.com"

    def auth(self) -> dict[str, str]:
        return {}

    async def open_worker(self):
        if self._signer is None:
            self._signer = _make_signer(self.region)
        return await super().open_worker()

    def build(self, messages: list[Message]) -> ApiRequest:
        [message] = messages  # SendEmail takes one message; batch_size is 1
        # The body is joined as bytes around the base64 (which needs no JSON escaping):
        # json.dumps of a 55 KB string, then encoding it, cost more than the base64 itself.
        head = json.dumps({"FromEmailAddress": message.factory.from_email,  # never the VERP bounce address
                           "Destination": {"ToAddresses": [message.recipient]}})[:-1]
        tail = self._tail
        if tail is None:
            config_set = self.settings.extra.get("configuration_set")
            tail = self._tail = b'"}}' + (b', "ConfigurationSetName": ' + json.dumps(config_set).encode()
                                          if config_set else b"") + b"}"
        content = b"".join((head.encode(), b', "Content": {"Raw": {"Data": "', base64.b64encode(message.data), tail))
        return ApiRequest("POST", "/v2/email/outbound-emails", content=content,
                          headers={"Content-Type": "application/json"})

    def build_single(self, message) -> ApiRequest:
        body = {"FromEmailAddress": message.sender, "Destination": {"ToAddresses": [message.recipient]},
                "Content": {"Raw": {"Data": base64.b64encode(message.data).decode("ascii")}}}
        if config_set := self.settings.extra.get("configuration_set"):
            body["ConfigurationSetName"] = config_set
        return ApiRequest("POST", "/v2/email/outbound-emails", content=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json"})

    def single_results(self, response: httpx.Response, messages: list) -> list[Outcome]:
        return self.results(response, messages)

    def sign(self, request: httpx.Request) -> httpx.Request:
        return self._signer(request)

    def error_text(self, response: httpx.Response) -> str:
        kind = response.headers.get("x-amzn-errortype", "").split(":")[0]
        text = super().error_text(response)
        return f"{kind}: {text}" if kind else text

    def refusal(self, response: httpx.Response, messages: list[Message]) -> tuple[Outcome, int | None]:
        status, kind = response.status_code, response.headers.get("x-amzn-errortype", "").split(":")[0]
        text = self.error_text(response)
        code = f"SES {kind}" if kind else None
        if kind == "MessageRejected":  # the sandbox's unverified recipient too: the account's, not the reader's
            return self.refused(MESSAGE if _CONTENT.search(text) else SENDER, status, text, code), None
        if kind in SENDER_ERRORS or (status == 429 and "quota" in text.lower()):
            return self.refused(SENDER, status, text, code), None
        outcome, index = super().refusal(response, messages)
        if outcome.state == FAILED and code:  # "SES SignatureDoesNotMatch" says more than "Amazon SES 403"
            outcome = self.refused(outcome.fault, status, text, code)
        return outcome, index

    def results(self, response: httpx.Response, messages: list[Message]) -> list[Outcome]:
        message_id = json_body(response).get("MessageId", "")
        return [Outcome(SENT, f"{response.status_code} MessageId {message_id}".strip())]


def _make_signer(region: str):
    try:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials
    except ImportError:
        raise SendError("ses: needs botocore, for AWS request signing: pip install 'newsletter[ses]'") from None
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise SendError("ses: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set")
    auth = SigV4Auth(Credentials(key, secret, os.environ.get("AWS_SESSION_TOKEN")), "ses", region)

    class Request(AWSRequest):
        # SigV4Auth reads `body` for the payload hash; AWSRequest makes a whole prepared
        # request (headers copied, Content-Length worked out) each time to give it.
        @property
        def body(self):
            return self.data

    def sign(request: httpx.Request) -> httpx.Request:
        # Host as httpx sends it: botocore would otherwise parse the URL for it (twice).
        headers = request.headers
        aws = Request(method=request.method, url=str(request.url), data=request.content,
                      headers={"Content-Type": headers.get("content-type", "application/json"),
                               "Host": headers["host"]})
        auth.add_auth(aws)
        for name, value in aws.headers.items():
            if name != "Host":
                headers[name] = value
        return request

    return sign
