"""One real HTTP server on loopback standing in for five email APIs: SendGrid, Mailgun,
Postmark, Resend and Amazon SES v2. It routes by path, checks each request against the
provider's documented shape and limits (/tmp/esp-research.md, the providers' docs), answers
the way the provider does, and records what each recipient would have received.

    with ApiServer() as server:
        server.url                      # http://127.0.0.1:PORT, the base_url for every provider
        server.throttle(2, retry_after=1)   # the next 2 requests: 429 with Retry-After: 1
        ...
        server.received                 # one Received per recipient message
        server.requests                 # every request, with its arrival time and answer

Checks, per provider (a request that fails one gets the provider's error, not a pass):
    method (POST), path, auth, JSON/form shape, required fields, batch limits, and for SES
    the SigV4 signature, recomputed with botocore from the same credentials and X-Amz-Date.
Expansion into per-recipient messages: SendGrid applies each personalization's
``substitutions`` to subject and content and takes its ``headers``; Mailgun applies
``recipient-variables`` to ``%recipient.x%`` in subject, text, html and ``h:`` headers;
Postmark and Resend take each item as it is; SES parses the raw MIME.
Single messages (a transactional message, such as a sign-up confirmation): SendGrid, Mailgun
and SES on the same endpoints (one personalization; no recipient-variables; one Raw
message); Postmark ``POST /email`` (one message object, ``MessageStream`` defaulting to
``outbound``, answered 200 ``{"ErrorCode": 0, "MessageID", "To", ...}`` or 422 with its
ErrorCode); Resend ``POST /emails`` (one email object, answered 200 ``{"id"}``, its
Idempotency-Key honoured as for a batch).
Faults, scripted per test: 429 (with or without Retry-After; SendGrid's X-RateLimit-Reset
window), 5xx, a slow answer (before, during or after the request is processed), a 200 of
an unexpected shape, a per-message error (Postmark 406 inactive recipient; Resend ``errors[]`` in permissive
mode), a whole-request 4xx for a batch holding a chosen address, a 5xx or a connection reset after the
request was taken and recorded (a lost answer), an unverified sender (each provider's own answer: SendGrid
403, Postmark ErrorCode 400 per message, Resend 403, SES 400 MessageRejected), and any error answer in the
provider's shape (``refuse``). Resend's
Idempotency-Key is honoured: a repeat with the same body replays the first answer without
recording anything again; a different body is 409 invalid_idempotent_request; a repeat
while the first is still being processed is 409 concurrent_idempotent_requests.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import email
import email.policy
import hashlib
import hmac
import json
import re
import socket
import struct
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formataddr, getaddresses
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

PROVIDERS = ("sendgrid", "mailgun", "postmark", "resend", "ses")
KEYS = {  # what the server accepts; made to be easy to spot if they ever leak into output
    "sendgrid": "SG.fake-sendgrid-key.K3y-That-Must-Never-Leak-1111",
    "mailgun": "key-fake-mailgun-K3y-That-Must-Never-Leak-2222",
    "postmark": "fake-postmark-token-K3y-That-Must-Never-Leak-3333",
    "resend": "re_fake_resend_K3y_That_Must_Never_Leak_4444",
}
AWS_KEY_ID = "AKIAFAKEKEYID0000001"
AWS_SECRET = "fake/AWS+secret-K3y-That-Must-Never-Leak-5555"
SES_REGION = "eu-west-1"
MAILGUN_DOMAIN = "mg.example.com"
POSTMARK_STREAMS = ("broadcast", "outbound")
LIMITS = {"sendgrid": 1000, "mailgun": 1000, "postmark": 500, "resend": 100, "ses": 1}

ROUTES = [
    ("sendgrid", re.compile(r"/v3/mail/send")),
    ("mailgun", re.compile(r"/v3/(?P<domain>[^/]+)/messages")),
    ("postmark", re.compile(r"/email(?P<batch>/batch)?")),  # /email: one message
    ("resend", re.compile(r"/emails(?P<batch>/batch)?")),  # /emails: one email
    ("ses", re.compile(r"/v2/email/outbound-emails")),
]
SENDGRID_RESERVED = {"x-sg-id", "x-sg-eid", "received", "dkim-signature", "content-type",
                     "content-transfer-encoding", "to", "from", "subject", "reply-to", "cc", "bcc"}
AMZN_NS = "http://internal.amazon.com/coral/com.amazon.coral.service/"
_NO = object()
_RESET = object()  # an answer: reset the connection (RST) instead of answering


@dataclass
class Received:
    """One message as one recipient would get it."""
    provider: str
    address: str  # the plain address, as the provider delivers to it
    to: str  # the To the recipient sees
    subject: str
    html: str
    text: str
    headers: dict[str, str]  # lower-case names
    request: int  # index into ApiServer.requests
    id: str  # the provider's id for it


@dataclass
class Request:
    index: int
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    arrived: float  # time.monotonic() when the request line and headers were read
    provider: str | None = None
    prefix: str = ""
    recipients: list[str] = field(default_factory=list)  # the batch's addresses, as far as they parse
    status: int | None = None
    outcome: str = ""  # accepted, replayed, throttled, failed, dropped, rejected, unauthorized, ...
    answer: bytes = b""
    answer_headers: dict[str, str] = field(default_factory=dict)
    sig_verified: bool = False  # SES: the signature was recomputed and matched

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")

    def json(self):
        return json.loads(self.body)


class Reject(Exception):
    """A whole-request error, in the provider's shape."""

    def __init__(self, status: int, message: str, code=None, field=None):
        super().__init__(message)
        self.status, self.message, self.code, self.field = status, message, code, field


@dataclass
class _Slow:
    seconds: float
    mode: str  # before: sleep, then drop the request unprocessed; during: sleep while processing
    # (Resend: the key is in progress); after: process and record, then sleep (a lost answer)


class ApiServer:
    def __init__(self, *, prefixes: tuple[str, ...] = ("",), aws_token: str | None = None):
        self.prefixes = sorted(prefixes, key=len, reverse=True)
        self.aws_token = aws_token  # AWS_SESSION_TOKEN the SES side expects, if any
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.busy = 0
        self.requests: list[Request] = []
        self.received: list[Received] = []
        self.errors: list[str] = []  # bugs in this fake itself: reported at exit
        # scripted faults
        self._throttle: list[float | str | None] = []
        self._fail: list[tuple[int, bool]] = []
        self._reset: list[bool] = []
        self._refuse: list[Reject] = []
        self.sender_verified = True  # False: every request is refused for its unverified From, as each provider does
        self._slow: list[_Slow] = []
        self._garble: list[bytes] = []
        self._page: list[tuple[int, bytes]] = []  # (status, HTML): a proxy's page instead of the provider's answer
        self._cut: int = 0  # requests whose connection is reset halfway through their body
        self._inactive: set[str] = set()
        self._reject: dict[str, int | None] = {}
        self.rate_limited_until: float | None = None  # SendGrid: 429 with X-RateLimit-Reset until then
        self._idempotency: dict[str, dict] = {}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.httpd.api = self
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, exc_type, *exc):
        self.wait_idle()
        self.httpd.shutdown()
        self.httpd.server_close()
        if exc_type is None and self.errors:
            raise AssertionError("the fake API server failed:\n" + "\n".join(self.errors))

    # -- scripting ------------------------------------------------------------------------------

    def throttle(self, times: int = 1, retry_after: float | str | None = 1) -> None:
        """The next `times` requests get 429, with `Retry-After: retry_after` unless None
        (a string is sent as it is)."""
        with self.lock:
            self._throttle += [retry_after] * times

    def fail(self, times: int = 1, status: int = 500, after: bool = False) -> None:
        """The next `times` requests get `status` (5xx): before anything is taken, or `after`
        the request was taken and recorded (what a crash or a proxy after the work looks like;
        Resend's key then holds the real answer)."""
        with self.lock:
            self._fail += [(status, after)] * times

    def reset(self, times: int = 1, after: bool = False) -> None:
        """The next `times` requests: the whole body is read, then the connection is reset
        with no answer: before anything is taken, or `after` it was taken and recorded."""
        with self.lock:
            self._reset += [after] * times

    def refuse(self, status: int, message: str, code=None, field=None, times: int = 1) -> None:
        """The next `times` authenticated requests get this error, in the provider's shape."""
        with self.lock:
            self._refuse += [Reject(status, message, code=code, field=field)] * times

    def slow(self, seconds: float, mode: str = "before", times: int = 1) -> None:
        assert mode in ("before", "during", "after")
        with self.lock:
            self._slow += [_Slow(seconds, mode)] * times

    def garble(self, times: int = 1, body: bytes = b'"queued"') -> None:
        """The next `times` requests get a 200 whose JSON body is not the provider's shape
        (nothing is recorded): what a proxy or a wrong base_url might answer."""
        with self.lock:
            self._garble += [body] * times

    def page(self, times: int = 1, status: int = 502, body: bytes | None = None) -> None:
        """The next `times` requests get an HTML page with `status` instead of the provider's
        JSON, as a proxy in front of it answers (nginx's 502 Bad Gateway; a 200 from a captive
        portal or a wrong base_url). Nothing is taken."""
        body = body or (f"<html>\r\n<head><title>{status} Bad Gateway</title></head>\r\n<body>\r\n<center>"
                        f"<h1>{status} Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n"
                        "</html>\r\n").encode()
        with self.lock:
            self._page += [(status, body)] * times

    def cut(self, times: int = 1) -> None:
        """The next `times` requests: half the body is read, then the connection is reset
        (RST) in the middle of the request. Nothing is taken."""
        with self.lock:
            self._cut += times

    def inactive(self, *addresses: str) -> None:
        """A per-message error for these: Postmark ErrorCode 406; Resend errors[] (permissive)."""
        with self.lock:
            self._inactive |= {a.lower() for a in addresses}

    def reject(self, address: str, status: int | None = None) -> None:
        """A whole-request 4xx (the provider's usual status) for any batch holding `address`."""
        with self.lock:
            self._reject[address.lower()] = status

    # -- results --------------------------------------------------------------------------------

    def delivered(self) -> Counter:
        with self.lock:
            return Counter(r.address for r in self.received)

    def accepted(self) -> list[Request]:
        """Requests whose messages were recorded (replays and errors excluded)."""
        with self.lock:
            return [r for r in self.requests if r.outcome == "accepted"]

    def seen(self, address: str) -> list[Request]:
        """Every request whose batch held `address`, whatever the answer."""
        with self.lock:
            return [r for r in self.requests if address.lower() in r.recipients]

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self.idle:
            while self.busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.idle.wait(left)

    # -- handling -------------------------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        arrived = time.monotonic()
        headers = {k.lower(): v for k, v in h.headers.items()}
        length = int(headers.get("content-length") or 0)
        with self.lock:
            cut, self._cut = self._cut > 0, max(self._cut - 1, 0)
        if cut:  # half of it, then RST: the client is still writing, or waiting for an answer
            h.rfile.read(length // 2)
            with self.lock:
                self.requests.append(Request(len(self.requests), h.command, h.path, headers, b"",
                                             arrived, outcome="cut mid-request"))
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            return
        body = h.rfile.read(length) if length else b""
        path = h.path.split("?", 1)[0]
        with self.lock:
            req = Request(len(self.requests), h.command, path, headers, body, arrived)
            self.requests.append(req)
            self.busy += 1
        try:
            answer = self._answer(req)
        except Exception:
            self.errors.append(f"{req.method} {req.path}: {traceback.format_exc()}")
            answer = (500, {"Content-Type": "text/plain"}, b"the fake server failed")
        try:
            if answer is None:  # dropped: the client gave up long ago
                h.close_connection = True
                return
            if answer is _RESET:  # linger 0: close() sends RST, the client reads a reset and no answer
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                h.close_connection = True
                return
            status, out_headers, payload = answer
            req.status, req.answer, req.answer_headers = status, payload, dict(out_headers)
            try:
                h.send_response(status)
                for k, v in out_headers.items():
                    h.send_header(k, v)
                h.send_header("Content-Length", str(len(payload)))
                h.end_headers()
                h.wfile.write(payload)
                h.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError):
                h.close_connection = True
        finally:
            with self.idle:
                self.busy -= 1
                self.idle.notify_all()

    def _route(self, req: Request):
        for prefix in self.prefixes:
            if req.path.startswith(prefix) or not prefix:
                rest = req.path[len(prefix):]
                for provider, pattern in ROUTES:
                    m = pattern.fullmatch(rest)
                    if m:
                        return provider, prefix, m.groupdict()
        return None, "", {}

    def _answer(self, req: Request):
        provider, prefix, params = self._route(req)
        req.provider, req.prefix = provider, prefix
        if provider is None:
            req.outcome = "not found"
            return _json(404, {"message": "Not Found", "path": req.path})
        if req.method != "POST":
            req.outcome = "bad method"
            return error(provider, Reject(405, f"Method {req.method} not allowed on {req.path}",
                                          code="MethodNotAllowed" if provider == "ses" else None))
        try:
            self._check_auth(provider, req)
        except Reject as r:
            req.outcome = "unauthorized"
            return error(provider, r)
        req.recipients = [a.lower() for a in _batch_addresses(provider, req)]

        # scripted faults, on authenticated requests at the right address
        throttle, fail, slow, garble, reset, refuse, page = _NO, None, None, None, None, None, None
        with self.lock:  # one fault a request, in this order
            if self._throttle:
                throttle = self._throttle.pop(0)
            elif self._refuse:
                refuse = self._refuse.pop(0)
            elif self._fail:
                fail = self._fail.pop(0)
            elif self._reset:
                reset = self._reset.pop(0)
            elif self._slow:
                slow = self._slow.pop(0)
            elif self._garble:
                garble = self._garble.pop(0)
            elif self._page:
                page = self._page.pop(0)
        if page is not None:
            req.outcome = "proxy page"
            return page[0], {"Content-Type": "text/html"}, page[1]
        if garble is not None:
            req.outcome = "garbled"
            return 200, {"Content-Type": "application/json"}, garble
        if throttle is not _NO:
            req.outcome = "throttled"
            return error(provider, _too_many(provider), {} if throttle is None else {"Retry-After": _num(throttle)})
        if provider == "sendgrid" and self.rate_limited_until and time.time() < self.rate_limited_until:
            req.outcome = "throttled"
            reset = str(int(self.rate_limited_until))
            return error(provider, _too_many(provider),
                         {"X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset})
        if refuse is not None:
            req.outcome = "refused"
            return error(provider, refuse)
        if fail is not None and not fail[1]:
            req.outcome = "failed"
            return error(provider, Reject(fail[0], "Internal server error", code="InternalFailure"))
        if reset is False:
            req.outcome = "reset"
            return _RESET
        if slow and slow.mode == "before":
            req.outcome = "dropped"  # decided now: it is never processed
            time.sleep(slow.seconds)
            return None

        key = req.idempotency_key if provider == "resend" else None
        if key is not None:
            replay = self._idempotency_check(key, req)
            if replay is not None:
                return replay
        try:
            if slow and slow.mode == "during":
                time.sleep(slow.seconds)
            try:
                status, out_headers, payload, received = getattr(self, f"_{provider}")(req, params)
            except Reject as r:
                req.outcome = "rejected"
                status, out_headers, payload = error(provider, r)
                received = []
            if 200 <= status < 300:
                with self.lock:
                    req.outcome = "accepted"
                    for r in received:
                        r.request = req.index
                    self.received.extend(received)
            if key is not None:
                with self.lock:
                    if 200 <= status < 300:
                        self._idempotency[key].update(state="done", answer=(status, out_headers, payload))
                    else:
                        self._idempotency.pop(key, None)
                key = None
        finally:
            if key is not None:  # the fake failed: forget the key
                with self.lock:
                    self._idempotency.pop(key, None)
        if slow and slow.mode == "after":
            time.sleep(slow.seconds)
        if fail is not None:  # after: taken and recorded, then the error
            req.outcome = "failed after taking it" if 200 <= status < 300 else req.outcome
            return error(provider, Reject(fail[0], "Internal server error", code="InternalFailure"))
        if reset:
            req.outcome = "reset after taking it" if 200 <= status < 300 else req.outcome
            return _RESET
        return status, out_headers, payload

    def _idempotency_check(self, key: str, req: Request):
        if not 1 <= len(key) <= 256:
            req.outcome = "rejected"
            return error("resend", Reject(400, "The key must be between 1-256 chars.", code="invalid_idempotency_key"))
        try:
            fingerprint = hashlib.sha256(json.dumps(json.loads(req.body), sort_keys=True).encode()).hexdigest()
        except ValueError:
            fingerprint = hashlib.sha256(req.body).hexdigest()
        with self.lock:
            entry = self._idempotency.get(key)
            if entry is None:
                self._idempotency[key] = {"fingerprint": fingerprint, "state": "in progress"}
                return None
        if entry["fingerprint"] != fingerprint:
            req.outcome = "conflict"
            return error("resend", Reject(409, "This idempotency key has been used on a request with a different "
                                               "payload. Idempotency keys should be unique and should not be "
                                               "reused with different payloads.", code="invalid_idempotent_request"))
        if entry["state"] != "done":
            req.outcome = "conflict"
            return error("resend", Reject(409, "Same idempotency key used while original request is still in "
                                               "progress.", code="concurrent_idempotent_requests"))
        req.outcome = "replayed"
        return entry["answer"]

    # -- auth -----------------------------------------------------------------------------------

    def _check_auth(self, provider: str, req: Request) -> None:
        h = req.headers
        if provider == "sendgrid":
            value = h.get("authorization")
            if not value:
                raise Reject(401, "authorization required")
            if value != f"Bearer {KEYS['sendgrid']}":
                raise Reject(401, "The provided authorization grant is invalid, expired, or revoked")
        elif provider == "mailgun":
            value = h.get("authorization", "")
            try:
                decoded = base64.b64decode(value.removeprefix("Basic "), validate=True).decode()
                user, _, password = decoded.partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user = password = ""
            if not value.startswith("Basic ") or user != "api" or password != KEYS["mailgun"]:
                raise Reject(401, "Forbidden")
        elif provider == "postmark":
            value = h.get("x-postmark-server-token")
            if not value:
                raise Reject(401, "No Account or Server API tokens were supplied in the HTTP headers. Please add a "
                                  "header for either X-Postmark-Server-Token or X-Postmark-Account-Token.", code=10)
            if value != KEYS["postmark"]:
                raise Reject(401, "The Server API Token you provided in the X-Postmark-Server-Token request header "
                                  "was invalid. Please verify that you are using a valid token.", code=10)
        elif provider == "resend":
            value = h.get("authorization")
            if not value or not value.startswith("Bearer "):
                raise Reject(401, "Missing API key in the authorization header. Include the following header "
                                  "Authorization: Bearer YOUR_API_KEY in the request.", code="missing_api_key")
            if value != f"Bearer {KEYS['resend']}":
                raise Reject(403, "API key is invalid", code="invalid_api_key")
        elif provider == "ses":
            self._check_sigv4(req)

    def _check_sigv4(self, req: Request) -> None:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        h = req.headers
        value = h.get("authorization")
        if not value:
            raise Reject(403, "Missing Authentication Token", code="MissingAuthenticationTokenException")
        m = re.fullmatch(r"AWS4-HMAC-SHA256 Credential=(?P<akid>[^/,]+)/(?P<date>\d{8})/(?P<region>[^/,]+)/"
                         r"(?P<service>[^/,]+)/aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;-]+), ?"
                         r"Signature=(?P<signature>[0-9a-f]{64})", value)
        if not m:
            raise Reject(403, f"Authorization header requires 'Credential', 'SignedHeaders' and 'Signature': "
                              f"{value[:40]}...", code="IncompleteSignatureException")
        if m["akid"] != AWS_KEY_ID:
            raise Reject(403, "The security token included in the request is invalid.",
                         code="UnrecognizedClientException")
        amz_date = h.get("x-amz-date", "")
        if not re.fullmatch(r"\d{8}T\d{6}Z", amz_date) or amz_date[:8] != m["date"]:
            raise Reject(403, "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
                              "from HTTP", code="InvalidSignatureException")
        if m["region"] != SES_REGION:
            raise Reject(403, f"Credential should be scoped to a valid region, not '{m['region']}'. ",
                         code="InvalidSignatureException")
        if m["service"] != "ses":
            raise Reject(403, "Credential should be scoped to correct service: 'ses'. ",
                         code="InvalidSignatureException")
        signed_at = calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
        if abs(time.time() - signed_at) > 300:
            raise Reject(403, "Signature expired", code="InvalidSignatureException")
        signed = m["signed"].split(";")
        missing = [n for n in ("host", "x-amz-date") if n not in signed]
        if self.aws_token:
            if h.get("x-amz-security-token") != self.aws_token:
                raise Reject(403, "The security token included in the request is invalid.",
                             code="UnrecognizedClientException")
            if "x-amz-security-token" not in signed:
                missing.append("x-amz-security-token")
        if missing or any(n not in h for n in signed):
            raise Reject(403, f"Signed headers missing or not sent: {missing or signed}",
                         code="IncompleteSignatureException")
        aws = AWSRequest(method=req.method, url=f"http://{h['host']}{req.path}", data=req.body,
                         headers={n: h[n] for n in signed})
        aws.context["timestamp"] = amz_date
        signer = SigV4Auth(Credentials(AWS_KEY_ID, AWS_SECRET, self.aws_token), "ses", SES_REGION)
        expected = signer.signature(signer.string_to_sign(aws, signer.canonical_request(aws)), aws)
        if not hmac.compare_digest(expected, m["signature"]):
            raise Reject(403, "The request signature we calculated does not match the signature you provided. "
                              "Check your AWS Secret Access Key and signing method. Consult the service "
                              "documentation for details.", code="SignatureDoesNotMatch")
        req.sig_verified = True

    # -- the providers --------------------------------------------------------------------------

    def _rejected(self, addresses: list[str]) -> str | None:
        with self.lock:
            return next((a for a in addresses if a.lower() in self._reject), None)

    def _reject_status(self, address: str, default: int) -> int:
        with self.lock:
            return self._reject.get(address.lower()) or default

    def _is_inactive(self, address: str) -> bool:
        with self.lock:
            return address.lower() in self._inactive

    def _sendgrid(self, req: Request, params):
        if not req.headers.get("content-type", "").startswith("application/json"):
            raise Reject(415, "Content-Type should be application/json.")
        body = _load_json(req.body, Reject(400, "Bad Request", field=None))
        if not isinstance(body, dict):
            raise Reject(400, "Bad Request")
        pers = body.get("personalizations")
        if not isinstance(pers, list) or not pers:
            raise Reject(400, "The personalizations field is required and must have at least 1 personalization.",
                         field="personalizations")
        if len(pers) > 1000:
            raise Reject(400, "The personalizations field has too many personalizations; the maximum is 1000.",
                         field="personalizations")
        sender = body.get("from")
        if not isinstance(sender, dict) or not isinstance(sender.get("email"), str) or "@" not in sender["email"]:
            raise Reject(400, "The from object must be provided for every email send. It is an object that requires "
                              "the email parameter, but may also contain a name parameter.", field="from.email")
        if not self.sender_verified:
            raise Reject(403, "The from address does not match a verified Sender Identity. Mail cannot be sent until "
                              "this error is resolved. Visit https://sendgrid.com/docs/for-developers/sending-email/"
                              "sender-identity/ to see the Sender Identity requirements", field="from")
        content = body.get("content")
        if not isinstance(content, list) or not content or not all(
                isinstance(c, dict) and isinstance(c.get("type"), str) and isinstance(c.get("value"), str)
                and c["value"] for c in content):
            raise Reject(400, "Unless a valid template_id is provided, the content parameter is required. There "
                              "must be at least one defined content block.", field="content")
        types = [c["type"] for c in content]
        if "text/plain" in types and types[0] != "text/plain":
            raise Reject(400, "If present, text/plain content must be first, followed by text/html, followed by "
                              "any other content.", field="content")
        subject = body.get("subject")
        if not (isinstance(subject, str) and subject) and not all(isinstance(p, dict) and p.get("subject")
                                                                   for p in pers):
            raise Reject(400, "The subject is required. You can get around this requirement if you use a template "
                              "with a subject defined or if every personalization has a subject defined.",
                         field="subject")
        top_headers = _string_dict(body.get("headers", {}), "headers")
        seen: set[str] = set()
        out = []
        for i, p in enumerate(pers):
            if not isinstance(p, dict):
                raise Reject(400, "Invalid type. Expected: object", field=f"personalizations.{i}")
            to = p.get("to")
            if not isinstance(to, list) or not to:
                raise Reject(400, "The to array is required for all personalization objects, and must have at "
                                  "least one email object with a valid email address.",
                             field=f"personalizations.{i}.to")
            people = []
            for kind in ("to", "cc", "bcc"):
                for j, person in enumerate(p.get(kind) or []):
                    if not isinstance(person, dict) or not isinstance(person.get("email"), str) \
                            or "@" not in person["email"]:
                        raise Reject(400, "Does not contain a valid address.",
                                     field=f"personalizations.{i}.{kind}.{j}.email")
                    name = person.get("name")
                    if name is not None and (not isinstance(name, str) or any(c in name for c in ";,")):
                        raise Reject(400, "The to name may not contain ; or ,",
                                     field=f"personalizations.{i}.{kind}.{j}.name")
                    address = person["email"].lower()
                    if address in seen:
                        raise Reject(400, "Each email address in the personalization block should be unique "
                                          "between to, cc, and bcc. We found the first duplicate instance of "
                                          f"[{person['email']}] in the personalizations.{i}.{kind} field.",
                                     field=f"personalizations.{i}.{kind}")
                    seen.add(address)
                    people.append(person)
            if len(seen) > 1000:
                raise Reject(400, "The total number of recipients must be no more than 1000.",
                             field="personalizations")
            headers = _string_dict(p.get("headers", {}), f"personalizations.{i}.headers")
            substitutions = _string_dict(p.get("substitutions", {}), f"personalizations.{i}.substitutions")
            _string_dict(p.get("custom_args", {}), f"personalizations.{i}.custom_args")
            out.append((p, people, headers, substitutions))
        for name in list(top_headers) + [n for _, _, h, _ in out for n in h]:
            if name.lower() in SENDGRID_RESERVED:
                raise Reject(400, f"The header '{name}' is reserved and cannot be set.", field="headers")
        addresses = [person["email"] for _, people, _, _ in out for person in people]
        if bad := self._rejected(addresses):  # as SendGrid names a bad address: by its field, not its words
            where = next(f"personalizations.{i}.to.{j}.email" for i, (_, people, _, _) in enumerate(out)
                         for j, person in enumerate(people) if person["email"] == bad)
            raise Reject(self._reject_status(bad, 400), "Does not contain a valid address.", field=where)
        batch = uuid.uuid4().hex
        received = []
        for p, people, headers, subs in out:
            def fill(text: str) -> str:
                for tag, value in subs.items():
                    text = text.replace(tag, value)
                return text
            bodies = {c["type"]: fill(c["value"]) for c in content}
            merged = {**{k.lower(): v for k, v in top_headers.items()}, **{k.lower(): v for k, v in headers.items()}}
            for person in people:
                received.append(Received("sendgrid", person["email"].lower(),
                                         formataddr((person.get("name") or "", person["email"])),
                                         fill(p.get("subject") or subject), bodies.get("text/html", ""),
                                         bodies.get("text/plain", ""), merged, -1, batch))
        return 202, {"X-Message-Id": batch}, b"", received

    def _mailgun(self, req: Request, params):
        domain = params["domain"]
        if domain != MAILGUN_DOMAIN:
            raise Reject(404, f"Domain not found: {domain}")
        fields = _form_fields(req)
        values: dict[str, list[str]] = {}
        for name, value in fields:
            values.setdefault(name, []).append(value)

        def one(name):
            return values.get(name, [None])[-1]

        if not one("from"):
            raise Reject(400, "from parameter is missing")
        if not values.get("to"):
            raise Reject(400, "to parameter is missing")
        if not one("subject"):
            raise Reject(400, "subject parameter is missing")
        if not (one("text") or one("html") or one("template")):
            raise Reject(400, "Need at least one of 'text', 'html' or 'template' parameters specified")
        to_entries = getaddresses(values["to"])
        everyone = to_entries + getaddresses(values.get("cc", [])) + getaddresses(values.get("bcc", []))
        if any("@" not in address for _, address in everyone):
            raise Reject(400, "'to' parameter is not a valid address. please check documentation")
        if len(everyone) > 1000:
            raise Reject(400, "Too many recipients; max is 1000")
        options = sum(len(n) + len(v) for n, v in fields if n[:2] in ("o:", "h:", "v:"))
        if options > 16 * 1024:
            raise Reject(400, "Send options (parameters starting with o:, h:, or v:) are limited to 16 kB total")
        variables = None
        if one("recipient-variables") is not None:
            try:
                variables = json.loads(one("recipient-variables"))
                assert isinstance(variables, dict)
            except (ValueError, AssertionError):
                raise Reject(400, "recipient-variables parameter is not a valid JSON") from None
        if bad := self._rejected([a for _, a in everyone]):
            raise Reject(self._reject_status(bad, 400), f"'to' parameter is not a valid address: {bad}")
        headers = {n[2:].lower(): v for n, v in fields if n.startswith("h:")}
        batch = f"<{time.strftime('%Y%m%d%H%M%S')}.{uuid.uuid4().hex[:12]}@{domain}>"
        received = []
        for name, address in everyone:
            if variables is None:  # not a batch send: everybody sees everybody
                mine: dict = {}
                shown = ", ".join(values["to"])
            else:
                mine = variables.get(address, {})
                shown = formataddr((name, address))

            def fill(text):
                if text is None:
                    return ""
                return re.sub(r"%recipient\.([A-Za-z0-9_.-]+)%",
                              lambda m: str(mine[m[1]]) if m[1] in mine else m[0], text)

            received.append(Received("mailgun", address.lower(), shown, fill(one("subject")), fill(one("html")),
                                     fill(one("text")), {k: fill(v) for k, v in headers.items()}, -1, batch))
        return 200, {"Content-Type": "application/json"}, json.dumps(
            {"id": batch, "message": "Queued. Thank you."}).encode(), received

    def _postmark(self, req: Request, params):
        if req.headers.get("accept") != "application/json" or \
                not req.headers.get("content-type", "").startswith("application/json"):
            raise Reject(422, "JSON data required. Please add 'Content-Type: application/json' and "
                              "'Accept: application/json' headers.", code=409)
        batch = _load_json(req.body, Reject(422, "The request body is not valid JSON.", code=402))
        if not params.get("batch"):
            return self._postmark_single(batch)
        if not isinstance(batch, list):
            raise Reject(422, "The batch must be a JSON array of messages.", code=402)
        if len(batch) > 500:
            raise Reject(422, "Too many batch messages. The maximum is 500.", code=410)
        addresses = [a for item in batch if isinstance(item, dict) for _, a in getaddresses([item.get("To") or ""])]
        if bad := self._rejected(addresses):
            raise Reject(self._reject_status(bad, 422), f"Invalid 'To' address: '{bad}'.", code=300)
        answers, received = [], []
        for item in batch:
            problem = _postmark_problem(item)
            people = getaddresses([item.get("To") or ""]) if isinstance(item, dict) else []
            inactive = [a for _, a in people if self._is_inactive(a)]
            if problem:
                answers.append({"ErrorCode": problem[0], "Message": problem[1]})
            elif not self.sender_verified:
                answers.append({"ErrorCode": 400, "Message": f"The 'From' address you supplied ({item['From']}) is not a "
                                "Sender Signature on your account. Please add and confirm this address in order to be "
                                "able to use it in the 'From' field of your messages."})
            elif inactive:
                answers.append({"ErrorCode": 406, "Message": "You tried to send to a recipient that has been marked "
                                "as inactive.\nFound inactive addresses: " + ", ".join(inactive) + ".\nInactive "
                                "recipients are ones that have generated a hard bounce or a spam complaint."})
            else:
                message_id = str(uuid.uuid4())
                headers = {h["Name"].lower(): h["Value"] for h in item.get("Headers") or []}
                for name, address in people:
                    received.append(Received("postmark", address.lower(), item["To"], item.get("Subject", ""),
                                             item.get("HtmlBody", ""), item.get("TextBody", ""), headers, -1,
                                             message_id))
                answers.append({"ErrorCode": 0, "Message": "OK", "MessageID": message_id,
                                "SubmittedAt": time.strftime("%Y-%m-%dT%H:%M:%S.0000000+00:00", time.gmtime()),
                                "To": item["To"]})
        return 200, {"Content-Type": "application/json"}, json.dumps(answers).encode(), received

    def _postmark_single(self, item):
        """POST /email: one message; its errors are the whole request's (422 with ErrorCode)."""
        if not isinstance(item, dict):
            raise Reject(422, "The message must be a JSON object.", code=402)
        if problem := _postmark_problem(item):
            raise Reject(422, problem[1], code=problem[0])
        people = getaddresses([item["To"]])
        if not self.sender_verified:
            raise Reject(422, f"The 'From' address you supplied ({item['From']}) is not a Sender Signature on your "
                              "account. Please add and confirm this address in order to be able to use it in the "
                              "'From' field of your messages.", code=400)
        if bad := self._rejected([a for _, a in people]):
            raise Reject(self._reject_status(bad, 422), f"Invalid 'To' address: '{bad}'.", code=300)
        if inactive := [a for _, a in people if self._is_inactive(a)]:
            raise Reject(422, "You tried to send to a recipient that has been marked as inactive.\nFound inactive "
                              f"addresses: {', '.join(inactive)}.\nInactive recipients are ones that have generated a "
                              "hard bounce or a spam complaint.", code=406)
        message_id = str(uuid.uuid4())
        headers = {h["Name"].lower(): h["Value"] for h in item.get("Headers") or []}
        received = [Received("postmark", address.lower(), item["To"], item["Subject"], item.get("HtmlBody", ""),
                             item.get("TextBody", ""), headers, -1, message_id) for _, address in people]
        answer = {"To": item["To"], "SubmittedAt": time.strftime("%Y-%m-%dT%H:%M:%S.0000000+00:00", time.gmtime()),
                  "MessageID": message_id, "ErrorCode": 0, "Message": "OK"}
        return 200, {"Content-Type": "application/json"}, json.dumps(answer).encode(), received

    def _resend_single(self, req: Request):
        """POST /emails: one email; its errors are the whole request's."""
        item = _load_json(req.body, Reject(422, "Invalid JSON body", code="validation_error"))
        if problem := _resend_problem(item, batch=False):
            raise Reject(422, problem, code="validation_error")
        people = [a for _, a in getaddresses(_resend_to(item))]
        if not self.sender_verified:
            domain = getaddresses([item["from"]])[0][1].rpartition("@")[2]
            raise Reject(403, f"The {domain} domain is not verified. Please, add and verify your domain on "
                              "https://resend.com/domains", code="validation_error")
        if bad := self._rejected(people) or next((a for a in people if self._is_inactive(a)), None):
            raise Reject(self._reject_status(bad, 422), f"Invalid `to` field: {bad}", code="validation_error")
        email_id = str(uuid.uuid4())
        headers = {k.lower(): v for k, v in (item.get("headers") or {}).items()}
        received = [Received("resend", address.lower(), shown, item["subject"], item.get("html", ""),
                             item.get("text", ""), headers, -1, email_id)
                    for shown in _resend_to(item) for _, address in getaddresses([shown])]
        return 200, {"Content-Type": "application/json"}, json.dumps({"id": email_id}).encode(), received

    def _resend(self, req: Request, params):
        if not req.headers.get("content-type", "").startswith("application/json"):
            raise Reject(422, "Content-Type must be application/json", code="validation_error")
        if not params.get("batch"):
            return self._resend_single(req)
        mode = req.headers.get("x-batch-validation", "strict")
        if mode not in ("strict", "permissive"):
            raise Reject(422, "x-batch-validation must be strict or permissive", code="validation_error")
        batch = _load_json(req.body, Reject(422, "Invalid JSON body", code="validation_error"))
        if not isinstance(batch, list) or not batch:
            raise Reject(422, "The batch must be a non-empty array of emails.", code="validation_error")
        if len(batch) > 100:
            raise Reject(422, "Too many emails in the batch: the maximum is 100.", code="validation_error")
        addresses = [a for item in batch if isinstance(item, dict) for _, a in getaddresses(_resend_to(item))]
        if not self.sender_verified:
            domain = getaddresses([batch[0].get("from") or ""])[0][1].rpartition("@")[2]
            raise Reject(403, f"The {domain} domain is not verified. Please, add and verify your domain on "
                              "https://resend.com/domains", code="validation_error")
        if bad := self._rejected(addresses):
            raise Reject(self._reject_status(bad, 422), f"Invalid `to` field: {bad}", code="validation_error")
        errors, created, received = [], [], []
        for index, item in enumerate(batch):
            problem = _resend_problem(item)
            if not problem:
                inactive = [a for _, a in getaddresses(_resend_to(item)) if self._is_inactive(a)]
                if inactive:
                    problem = f"The `to` address {inactive[0]} is on the suppression list."
            if problem:
                if mode == "strict":
                    raise Reject(422, problem, code="validation_error")
                errors.append({"index": index, "message": problem})
                continue
            email_id = str(uuid.uuid4())
            created.append({"id": email_id})
            headers = {k.lower(): v for k, v in (item.get("headers") or {}).items()}
            for shown in _resend_to(item):
                [(name, address)] = getaddresses([shown])
                received.append(Received("resend", address.lower(), shown, item["subject"], item.get("html", ""),
                                         item.get("text", ""), headers, -1, email_id))
        answer = {"data": created}
        if mode == "permissive":
            answer["errors"] = errors
        return 200, {"Content-Type": "application/json"}, json.dumps(answer).encode(), received

    def _ses(self, req: Request, params):
        body = _load_json(req.body, Reject(400, "Could not parse request body into json", code="BadRequestException"))
        if not isinstance(body, dict):
            raise Reject(400, "Could not parse request body into json", code="BadRequestException")
        if not isinstance(body.get("FromEmailAddress"), str) or "@" not in body["FromEmailAddress"]:
            raise Reject(400, "FromEmailAddress is required", code="BadRequestException")
        destination = body.get("Destination")
        if not isinstance(destination, dict):
            raise Reject(400, "Destination is required", code="BadRequestException")
        people = [a for kind in ("ToAddresses", "CcAddresses", "BccAddresses") for a in destination.get(kind) or []]
        if not destination.get("ToAddresses") or not all(isinstance(a, str) and "@" in a for a in people):
            raise Reject(400, "Destination.ToAddresses must hold at least one valid address",
                         code="BadRequestException")
        if len(people) > 50:
            raise Reject(400, "Recipient count exceeds 50.", code="BadRequestException")
        content = body.get("Content")
        if not isinstance(content, dict) or sorted(content) != ["Raw"]:
            raise Reject(400, "Content must hold exactly one of Simple, Raw or Template (this fake: Raw)",
                         code="BadRequestException")
        try:
            raw = base64.b64decode(content["Raw"]["Data"], validate=True)
        except (binascii.Error, TypeError, KeyError, ValueError):
            raise Reject(400, "Content.Raw.Data must be base64", code="BadRequestException") from None
        head, sep, _ = raw.partition(b"\r\n\r\n")
        if not sep or not head or b":" not in head.split(b"\r\n")[0]:
            raise Reject(400, "Message must have headers and a body separated by a blank line",
                         code="MessageRejected")
        if any(len(line) > 998 for line in raw.split(b"\r\n")):
            raise Reject(400, "Message lines must not exceed 1000 characters", code="MessageRejected")
        message = email.message_from_bytes(raw, policy=email.policy.default)
        for once in ("List-Unsubscribe", "List-Unsubscribe-Post", "From", "Subject"):
            if len(message.get_all(once) or []) > 1:
                raise Reject(400, f"Duplicate header '{once}'.", code="MessageRejected")
        if not message["From"]:
            raise Reject(400, "Missing required header 'From'.", code="MessageRejected")
        if not self.sender_verified:
            raise Reject(400, "Email address is not verified. The following identities failed the check in region "
                              f"{SES_REGION.upper()}: {body['FromEmailAddress']}", code="MessageRejected")
        if bad := self._rejected(people):
            raise Reject(self._reject_status(bad, 400), "Email address is not verified. The following identities "
                         f"failed the check in region {SES_REGION.upper()}: {bad}", code="MessageRejected")
        html_part, text_part = message.get_body(("html",)), message.get_body(("plain",))
        headers = {k.lower(): str(v) for k, v in message.items()}
        message_id = f"0102{uuid.uuid4().hex}-000000"
        received = [Received("ses", address.lower(), str(message["To"]), str(message["Subject"]),
                             html_part.get_content() if html_part else "",
                             text_part.get_content() if text_part else "", headers, -1, message_id)
                    for _, address in getaddresses(people)]
        return 200, {"Content-Type": "application/json"}, json.dumps({"MessageId": message_id}).encode(), received


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection is closed after this

    def do_POST(self):
        self.server.api.handle(self)

    do_GET = do_PUT = do_DELETE = do_PATCH = do_POST

    def log_message(self, *args):
        pass


# -- the providers' error shapes ------------------------------------------------------------------

def error(provider: str, r: Reject, extra_headers: dict | None = None):
    headers = dict(extra_headers or {})
    if provider == "sendgrid":
        return _json(r.status, {"errors": [{"message": r.message, "field": r.field, "help": None}]}, headers)
    if provider == "mailgun":
        if r.status == 401:  # a bad key: not JSON (as seen by django-anymail's live tests)
            return r.status, {"Content-Type": "text/plain", **headers}, b"Forbidden"
        return _json(r.status, {"message": r.message}, headers)
    if provider == "postmark":
        return _json(r.status, {"ErrorCode": r.code if r.code is not None else r.status, "Message": r.message},
                     headers)
    if provider == "resend":
        names = {400: "validation_error", 401: "missing_api_key", 403: "invalid_api_key", 404: "not_found",
                 405: "method_not_allowed", 422: "validation_error", 429: "rate_limit_exceeded",
                 500: "internal_server_error"}
        return _json(r.status, {"statusCode": r.status, "message": r.message,
                                "name": r.code or names.get(r.status, "application_error")}, headers)
    code = r.code or {429: "TooManyRequestsException", 500: "InternalFailure"}.get(r.status, "BadRequestException")
    return _json(r.status, {"message": r.message}, {"x-amzn-ErrorType": f"{code}:{AMZN_NS}", **headers})


def _too_many(provider: str) -> Reject:
    return {
        "sendgrid": Reject(429, "too many requests"),
        "mailgun": Reject(429, "Too many requests"),
        "postmark": Reject(429, "Rate limit exceeded", code=429),
        "resend": Reject(429, "Too many requests. You can only make 2 requests per second.",
                         code="rate_limit_exceeded"),
        "ses": Reject(429, "Maximum sending rate exceeded.", code="TooManyRequestsException"),
    }[provider]


def _json(status: int, body, headers: dict | None = None):
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(body).encode()


def _num(seconds: float | str) -> str:
    if isinstance(seconds, str):  # as given, even if it is not a valid Retry-After
        return seconds
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)


def _load_json(body: bytes, problem: Reject):
    try:
        return json.loads(body)
    except ValueError:
        raise problem from None


def _string_dict(value, where: str) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise Reject(400, "Invalid type. Expected: object of strings", field=where)
    return value


def _form_fields(req: Request) -> list[tuple[str, str]]:
    kind = req.headers.get("content-type", "")
    if kind.startswith("application/x-www-form-urlencoded"):
        return parse_qsl(req.body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(req.body))
    if kind.startswith("multipart/form-data"):
        message = email.message_from_bytes(f"Content-Type: {kind}\r\n\r\n".encode() + req.body,
                                           policy=email.policy.HTTP)
        # A field without a charset of its own is in the form's, UTF-8 (RFC 7578 section 5.1).
        return [(part.get_param("name", header="content-disposition"),
                 part.get_payload(decode=True).decode(part.get_content_charset() or "utf-8"))
                for part in message.iter_parts()]
    raise Reject(400, "Content-Type must be multipart/form-data or application/x-www-form-urlencoded")


def _postmark_problem(item) -> tuple[int, str] | None:
    if not isinstance(item, dict):
        return 402, "Each message must be a JSON object."
    if not isinstance(item.get("From"), str) or "@" not in item["From"]:
        return 300, f"Invalid 'From' address: '{item.get('From') or ''}'."
    people = getaddresses([item.get("To") or ""])
    if not item.get("To") or not people or any("@" not in a for _, a in people):
        return 300, "Zero recipients specified" if not item.get("To") else f"Invalid 'To' address: '{item['To']}'."
    if len(people) > 50:
        return 300, "Maximum of 50 recipients allowed per message."
    if not item.get("Subject"):
        return 300, "A Subject is required."
    if not (item.get("HtmlBody") or item.get("TextBody")):
        return 300, "Provide either email TextBody or HtmlBody or both."
    headers = item.get("Headers", [])
    if not isinstance(headers, list) or not all(isinstance(h, dict) and set(h) == {"Name", "Value"}
                                                and all(isinstance(v, str) for v in h.values()) for h in headers):
        return 300, "Headers must be a list of {Name, Value}."
    metadata = item.get("Metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return 300, "Metadata values must be strings."
    if item.get("TrackLinks", "None") not in ("None", "HtmlAndText", "HtmlOnly", "TextOnly"):
        return 300, "Invalid TrackLinks value."
    if item.get("MessageStream", "outbound") not in POSTMARK_STREAMS:
        return 1235, f"The message stream '{item['MessageStream']}' does not exist on this server."
    return None


def _resend_to(item) -> list[str]:
    to = item.get("to") if isinstance(item, dict) else None
    if isinstance(to, str):
        return [to]
    return [t for t in to if isinstance(t, str)] if isinstance(to, list) else []


def _resend_problem(item, batch: bool = True) -> str | None:
    if not isinstance(item, dict):
        return "Each email must be an object."
    if not isinstance(item.get("from"), str) or "@" not in item["from"]:
        return "The `from` field is missing." if not item.get("from") else "Invalid `from` field."
    to = _resend_to(item)
    if not to:
        return "The `to` field is missing."
    if len(to) > 50 or any("@" not in a for _, a in getaddresses(to)):
        return "Invalid `to` field. The email address needs to follow the `email@example.com` or " \
               "`Name <email@example.com>` format."
    if not item.get("subject"):
        return "The `subject` field is missing."
    if not (item.get("html") or item.get("text")):
        return "Missing `html` or `text` field."
    for unsupported in ("attachments", "scheduled_at"):
        if unsupported in item and batch:
            return f"The `{unsupported}` field is not supported in batch emails."
    headers = item.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        return "The `headers` field must be an object of strings."
    return None


def _batch_addresses(provider: str, req: Request) -> list[str]:
    """The batch's recipients, as far as they can be read (for faults and `seen`)."""
    try:
        if provider == "sendgrid":
            return [person["email"] for p in json.loads(req.body)["personalizations"]
                    for kind in ("to", "cc", "bcc") for person in p.get(kind) or []]
        if provider == "mailgun":
            return [a for _, a in getaddresses([v for n, v in _form_fields(req) if n in ("to", "cc", "bcc")])]
        if provider == "postmark":
            body = json.loads(req.body)
            return [a for item in (body if isinstance(body, list) else [body])
                    for _, a in getaddresses([item.get("To") or ""])]
        if provider == "resend":
            body = json.loads(req.body)
            return [a for item in (body if isinstance(body, list) else [body]) for _, a in getaddresses(_resend_to(item))]
        if provider == "ses":
            d = json.loads(req.body)["Destination"]
            return [a for kind in ("ToAddresses", "CcAddresses", "BccAddresses") for a in d.get(kind) or []]
    except (ValueError, KeyError, TypeError, AttributeError, Reject):
        return []
    return []
