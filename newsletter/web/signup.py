"""Sign-up with double opt-in: a form, a POST that mails a signed confirmation link, and
the link's page, whose button (a POST) subscribes the reader.

    GET  /subscribe                   the form (email, optional name, a honeypot)
    POST /subscribe                   form data or JSON; CORS for [signup] allowed_origins
    OPTIONS /subscribe                the CORS preflight
    GET  /subscribe/confirm/{token}   a page with a button; changes nothing (link scanners GET it)
    POST /subscribe/confirm/{token}   subscribes the address in the token

Nobody learns from the answer whether an address is on the list: every valid request gets
the same status and body, and everything that depends on the address (is it suppressed,
was a confirmation sent lately, the mail itself) happens after the answer has gone out, in
the response's background task (Starlette runs it inside the request, so uvicorn's graceful
shutdown waits for it). A suppressed address (hard bounce, complaint) is never mailed and
never subscribed again; only the holder of a confirmation link hears so.

Rate limits and the resend window live in this process's memory: with several processes
each has its own.

Confirmation token (all of it signed with NEWSLETTER_SECRET, HMAC-SHA256, truncated to 16
bytes, compared in constant time):

    token = base64url(version (1) | expires, unix seconds (8) | address "\\n" name | HMAC (16))
"""

from __future__ import annotations

import asyncio
import base64
import email.policy
import hashlib
import hmac
import json
import logging
import math
import struct
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from urllib.parse import parse_qs, urlsplit

import jinja2
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from ..checks import address_problem
from ..config import API_BACKENDS, Config
from ..errors import ConfigError, StoreError
from ..message import display_address
from ..outcome import HARD_BOUNCE, MESSAGE, RECIPIENT, SENDER, SENT, Event
from ..recipients import Recipient, clean_name, normalize
from .plumbing import store_thread

log = logging.getLogger("newsletter.signup")

HONEYPOT = "website"  # a field people never see; bots that fill every field fill it
MAX_BODY = 16_384  # a sign-up is a few hundred bytes
MAX_TOKEN = 2048
VERSION = b"\x01"
SIG_BYTES = 16
BLOCKED_STATUSES = ("bounced", "complained")
SENDING_AT_ONCE = 2  # confirmations in flight: a burst of sign-ups must not open 100 SMTP sessions

ACCEPTED = ("Thank you. If this address can be subscribed, a message is on its way to it: "
            "follow its link to confirm your subscription.")


class TokenError(ValueError):
    status = 400


class TokenExpired(TokenError):
    status = 410


# -- the token ------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _sign(secret: bytes, list_id: str, payload: bytes) -> bytes:
    # Domain-separated from the unsubscribe tokens, and bound to this list.
    key_input = b"newsletter sign-up confirmation\0" + list_id.encode("utf-8") + b"\0" + payload
    return hmac.new(secret, key_input, hashlib.sha256).digest()[:SIG_BYTES]


def make_token(secret: bytes, list_id: str, address: str, name: str | None, expires: int) -> str:
    payload = VERSION + struct.pack(">Q", expires) + address.encode("utf-8") + b"\n" + (name or "").encode("utf-8")
    return _b64(payload + _sign(secret, list_id, payload))


def read_token(secret: bytes, list_id: str, token: str, now: float | None = None) -> tuple[str, str | None]:
    """(address, name) from a valid token; TokenExpired or TokenError otherwise."""
    if len(token) > MAX_TOKEN:
        raise TokenError("not a confirmation link")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, TypeError):
        raise TokenError("not a confirmation link") from None
    if _b64(raw) != token or len(raw) < 1 + 8 + 3 + 1 + SIG_BYTES or raw[:1] != VERSION:
        raise TokenError("not a confirmation link")
    payload, sig = raw[:-SIG_BYTES], raw[-SIG_BYTES:]
    if not hmac.compare_digest(sig, _sign(secret, list_id, payload)):
        raise TokenError("not a valid confirmation link")
    (expires,) = struct.unpack(">Q", payload[1:9])
    if expires < (time.time() if now is None else now):
        raise TokenExpired("this confirmation link has expired")
    address, _, name = payload[9:].decode("utf-8").partition("\n")
    return address, name or None


# -- limits -----------------------------------------------------------------------------------

class TokenBucket:
    """`capacity` requests per `period` seconds per key, refilled continuously. In memory,
    per process; the least recently seen keys are dropped beyond `max_keys`."""

    def __init__(self, capacity: int, period: float, max_keys: int = 100_000):
        self.capacity, self.rate, self.max_keys = capacity, capacity / period if capacity else 0.0, max_keys
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> float:
        """0 when the request may go on (a token is taken), else seconds until one is there."""
        if not self.capacity:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, stamp = self.buckets.pop(key, (float(self.capacity), now))
        tokens = min(float(self.capacity), tokens + (now - stamp) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self.buckets[key] = (tokens, now)
        while len(self.buckets) > self.max_keys:
            self.buckets.popitem(last=False)
        return wait


class RecentlySent:
    """At most one confirmation per address per window (in memory, per process)."""

    def __init__(self, window: float, max_keys: int = 100_000):
        self.window, self.max_keys = window, max_keys
        self.sent: OrderedDict[str, float] = OrderedDict()

    def claim(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        while self.sent and (next(iter(self.sent.values())) <= now - self.window or len(self.sent) > self.max_keys):
            self.sent.popitem(last=False)
        if self.window and key in self.sent:
            return False
        self.sent[key] = now
        return True


# -- pages ------------------------------------------------------------------------------------

_env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)

PAGE = _env.from_string("""<!DOCTYPE html>
<html lang="{{ lang }}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{{ title }} · {{ pub }}</title>
<style>
body { margin: 0; background: #f4f4f2; color: #1a1a1a;
  font: 17px/1.55 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
main { max-width: 32rem; margin: 3rem auto; background: #fff; padding: 2rem; border-radius: 6px; }
h1 { font-size: 1.5rem; margin-top: 0; }
label { display: block; margin: 1rem 0 .25rem; font-weight: 600; }
input[type=email], input[type=text] { width: 100%; box-sizing: border-box; padding: .6rem; font-size: 1rem;
  border: 1px solid #888; border-radius: 4px; }
button { margin-top: 1.25rem; padding: .7rem 1.4rem; font-size: 1rem; color: #fff; background: {{ accent }};
  border: 0; border-radius: 4px; cursor: pointer; }
.hp { position: absolute; left: -10000px; width: 1px; height: 1px; overflow: hidden; }
@media (prefers-color-scheme: dark) { body { background: #111; color: #eee; } main { background: #1d1d1d; } }
</style></head>
<body><main>
<h1>{{ title }}</h1>
{% for line in lines %}<p>{{ line }}</p>
{% endfor %}
{%- if form == "subscribe" %}
<form method="post" action="{{ action }}">
<label for="email">Email address</label>
<input id="email" name="email" type="email" required maxlength="254" autocomplete="email">
<label for="name">Name (optional)</label>
<input id="name" name="name" type="text" maxlength="200" autocomplete="name">
<div class="hp" aria-hidden="true"><label for="{{ honeypot }}">Leave this empty</label>
<input id="{{ honeypot }}" name="{{ honeypot }}" type="text" tabindex="-1" autocomplete="off"></div>
<button type="submit">Subscribe</button>
</form>
{%- elif form == "confirm" %}
<form method="post" action="{{ action }}"><button type="submit" id="confirm">Confirm my subscription</button></form>
{%- endif %}
</main></body></html>
""")

PAGE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "DENY"}


def _page(config: Config, title: str, lines: list[str], status: int = 200, form: str = "", action: str = "",
          headers: dict | None = None) -> HTMLResponse:
    html = PAGE.render(lang=config.publication.language, pub=config.publication.name, title=title, lines=lines,
                       form=form, action=action, honeypot=HONEYPOT, accent=config.design.accent_color)
    return HTMLResponse(html, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})


# -- the confirmation message ------------------------------------------------------------------

HTML = _env.from_string("""<!DOCTYPE html>
<html lang="{{ lang }}"><head><meta charset="utf-8"><title>Confirm your subscription to {{ pub }}</title></head>
<body style="font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; font-size: 16px;
line-height: 1.5; color: #1a1a1a;">
<p>Hello{% if name %} {{ name }}{% endif %},</p>
<p>Someone, probably you, asked to subscribe <strong>{{ address }}</strong> to {{ pub }}.</p>
<p><a href="{{ link }}" style="display: inline-block; padding: 10px 20px; background: {{ accent }}; color: #ffffff;
text-decoration: none; border-radius: 4px;">Confirm my subscription</a></p>
<p>Or open this link: <a href="{{ link }}">{{ link }}</a> (valid for {{ hours }} hours).</p>
<p style="color: #555555; font-size: 14px;">If it was not you, ignore this message: nothing happens unless the link
is followed.</p>
</body></html>
""")

_text_env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
# Plain text: not HTML-escaped.
TEXT = _text_env.from_string("""\
Hello{% if name %} {{ name }}{% endif %},

Someone, probably you, asked to subscribe {{ address }} to {{ pub }}.
To confirm, open this link and press the button (it is valid for {{ hours }} hours):

{{ link }}

If it was not you, ignore this message: nothing happens unless the link is followed.
""")

# 7bit: non-ASCII parts go as quoted-printable, headers RFC 2047 (DESIGN: policy.SMTP alone sends 8bit)
POLICY = email.policy.SMTP.clone(cte_type="7bit")


@dataclass(frozen=True)
class Confirmation:
    """What a backend's worker needs: the outbox and SMTP use data, sender and recipient
    (SES too, as raw MIME); the other HTTP APIs build their request from the parts."""

    data: bytes  # RFC 5322, CRLF
    sender: str  # envelope MAIL FROM, and the From address
    recipient: str  # envelope RCPT TO
    name: str | None = None  # the reader's, as given
    sender_name: str = ""
    subject: str = ""
    text: str = ""
    html: str = ""
    reply_to: str | None = None
    message_id: str = ""  # <...@sending domain>, as in data
    # Unlike a newsletter Message, nothing here promises that no line starts with "."
    needs_dot_stuffing = True

    @property
    def display_from(self) -> str:
        return display_address(self.sender_name, self.sender)

    @property
    def display_to(self) -> str:
        return display_address(self.name, self.recipient)

    def headers(self) -> dict[str, str]:
        """For an API, besides From, To, Subject and Reply-To: never List-Unsubscribe (not a newsletter)."""
        return {"Auto-Submitted": "auto-generated", "X-Newsletter-Message-Id": self.message_id.strip("<>")}


def confirmation(config: Config, address: str, name: str | None, link: str, hours: int,
                 now: float | None = None) -> Confirmation:
    pub, sender = config.publication, config.sender
    msg = EmailMessage(policy=POLICY)
    msg["From"] = Address(sender.name, addr_spec=sender.address)
    msg["To"] = Address(name or "", addr_spec=address)
    if sender.reply_to:
        msg["Reply-To"] = sender.reply_to
    msg["Subject"] = f"Confirm your subscription to {pub.name}"
    msg["Date"] = format_datetime(_utc(now), usegmt=True)
    msg["Message-ID"] = message_id = make_msgid("signup", domain=sender.domain)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to it
    values = dict(name=name, address=address, pub=pub.name, link=link, hours=hours, lang=pub.language,
                  accent=config.design.accent_color)
    text, html = TEXT.render(**values), HTML.render(**values)
    msg.set_content(text, subtype="plain", charset="utf-8")
    msg.add_alternative(html, subtype="html", charset="utf-8")
    return Confirmation(msg.as_bytes(policy=POLICY), sender.address, address, name=name, sender_name=sender.name,
                        subject=str(msg["Subject"]), text=text, html=html, reply_to=sender.reply_to,
                        message_id=message_id)


def _utc(now: float | None):
    import datetime as dt

    return dt.datetime.fromtimestamp(time.time() if now is None else now, dt.timezone.utc)


# -- the service --------------------------------------------------------------------------------

class Signup:
    """Made once per app (create_app); checks its settings there, so a sign-up that could not
    work stops `newsletter serve` at start with every problem named."""

    def __init__(self, config: Config):
        self.config = config
        self.settings = s = config.signup
        self.enabled = s.enabled
        self.backend = s.backend or config.send.backend
        problems = []
        if self.enabled:
            if not config.send.secret:
                problems.append("[signup] enabled: NEWSLETTER_SECRET must be set (it signs the confirmation links)")
            if not config.serve.public_url:
                problems.append(f"{config.path}: serve.public_url: required for sign-up (the confirmation "
                                "links point there), e.g. https://news.example.com")
            problems += _backend_problems(config, self.backend)
        if problems:
            raise ConfigError(problems)
        self.secret = (config.send.secret or "").encode("utf-8")
        self.list_id = config.publication.list_id
        self.origins = set(s.allowed_origins)
        own = urlsplit(config.serve.public_url) if config.serve.public_url else None
        self.own_origin = f"{own.scheme}://{own.netloc}".lower() if own else None
        self.by_address = TokenBucket(s.address_limit, 3600)
        self.by_client = TokenBucket(s.client_limit, 3600)
        self.recent = RecentlySent(s.resend_minutes * 60)
        self.sending = asyncio.Semaphore(SENDING_AT_ONCE)
        self.scheduled = 0  # confirmations handed to the background (counted before the answer)
        self.done: Counter = Counter()  # how each ended: sent, recent, blocked, failed

    # -- CORS --------------------------------------------------------------------------------

    def origin_allowed(self, origin: str, request: Request) -> bool:
        origin = origin.lower().rstrip("/")
        own = f"{request.url.scheme}://{request.url.netloc}".lower()
        return origin in self.origins or "*" in self.origins or origin in (own, self.own_origin)

    def cors_headers(self, request: Request) -> dict[str, str]:
        """For another site's page: its origin echoed (never "*" with credentials; we allow none)."""
        origin = request.headers.get("origin")
        if not origin or not self.origin_allowed(origin, request):
            return {"Vary": "Origin"}
        return {"Access-Control-Allow-Origin": "*" if "*" in self.origins else origin, "Vary": "Origin",
                "Access-Control-Expose-Headers": "Retry-After"}

    # -- sending -----------------------------------------------------------------------------

    def link(self, address: str, name: str | None) -> str:
        expires = int(time.time()) + self.settings.confirm_hours * 3600
        token = make_token(self.secret, self.list_id, address, name, expires)
        return f"{self.config.serve.public_url}/subscribe/confirm/{token}"

    async def deliver(self, address: str, name: str | None) -> None:
        """After the answer: whether anything goes out depends on the address, so none of it
        may show in the answer."""
        result = "failed"
        try:
            if not self.recent.claim(address.lower()):
                result = "recent"
            elif await store_thread(self.config.store).call(_blocked, address):
                result = "blocked"  # never mail a hard bounce or a complaint again
            else:
                result = await self._send(address, name)
        except Exception as exc:  # noqa: BLE001 - nobody is waiting for this answer: log it
            log.warning("sign-up: the confirmation to %s was not sent: %s: %s", address, type(exc).__name__, exc)
        finally:
            self.done[result] += 1

    async def _send(self, address: str, name: str | None) -> str:
        from ..backends import get_backend

        message = confirmation(self.config, address, name, self.link(address, name), self.settings.confirm_hours)
        async with self.sending:
            backend = get_backend(self.backend, self.config, "signup")
            async with asyncio.timeout(self.settings.send_timeout):
                # the outbox and SMTP: their usual worker; an HTTP API: its single-message endpoint
                worker = await backend.open_single_worker()
                try:
                    outcome = await worker.send(message)
                finally:
                    await worker.close()
                    await backend.close()
        if outcome.state == SENT:
            return "sent"
        # the provider's words, never the key (the reply holds no request headers)
        log.warning("sign-up: the confirmation to %s was not sent through %s (%s): %s", address, self.backend,
                    _whose(outcome), outcome.reply)
        if outcome.suppress:  # "no such mailbox": the same policy as any send's bounce
            event = Event(HARD_BOUNCE, address, "sign-up confirmation", outcome.reply)
            await store_thread(self.config.store).call(_record_event, event)
        return "failed"


# Run in the store's thread (plumbing.StoreThread), on its one connection.

def _blocked(store, address: str) -> bool:
    return store.suppressed(address) or store.status(address) in BLOCKED_STATUSES


def _record_event(store, event: Event) -> None:
    store.record_event(event)


def _confirm(store, address: str, name: str | None) -> str:
    """'subscribed', or 'blocked' for an address that bounced for good or complained."""
    with store.transaction():
        if _blocked(store, address):
            return "blocked"
        result = store.add(Recipient(address, name), "sign-up confirmed", resubscribe=True)
    return "blocked" if result == "suppressed" else "subscribed"


def _backend_problems(config: Config, backend: str) -> list[str]:
    """What a confirmation through `backend` lacks, said at start rather than logged per sign-up."""
    if backend not in API_BACKENDS:
        return []
    api, problems = config.apis[backend], []
    if backend != "ses" and not api.api_key:  # SES: AWS credentials, read when sending
        problems.append(f"[signup] sends confirmations through {backend}: NEWSLETTER_{backend.upper()}_API_KEY "
                        "must be set")
    if backend == "mailgun" and not api.extra.get("domain"):
        problems.append(f"{config.path}: mailgun.domain: required for sign-up confirmations through mailgun "
                        "(your sending domain, e.g. mg.example.com)")
    return problems


def _whose(outcome) -> str:
    """Who must act, in words, for the log."""
    return {SENDER: "refused: the key, the sender or the account must be fixed",
            MESSAGE: "refused: the request itself", RECIPIENT: "refused for this address",
            }.get(outcome.fault, f"{outcome.state}, on the provider's side")


def _service(request: Request) -> Signup:
    return request.app.state.signup


def _not_enabled(request: Request) -> Response:
    config = request.app.state.config
    return _page(config, "Not found", ["Sign-up is not open here."], status=404)


# -- the handlers ---------------------------------------------------------------------------------

async def form_page(request: Request) -> Response:
    service = _service(request)
    if not service.enabled:
        return _not_enabled(request)
    pub = service.config.publication.name
    # Not no-referrer, as on the other pages: with it, browsers send "Origin: null" with the form
    return _page(service.config, f"Subscribe to {pub}", [], form="subscribe", action="/subscribe",
                 headers={"Referrer-Policy": "strict-origin-when-cross-origin"})


async def preflight(request: Request) -> Response:
    service = _service(request)
    origin = request.headers.get("origin")
    if not service.enabled or not origin or not service.origin_allowed(origin, request) or \
            request.headers.get("access-control-request-method", "").upper() != "POST":
        return Response(status_code=403, headers={"Vary": "Origin"})
    return Response(status_code=204, headers={
        **service.cors_headers(request), "Access-Control-Allow-Methods": "POST",
        "Access-Control-Allow-Headers": "Content-Type, Accept", "Access-Control-Max-Age": "600"})


def _wants_json(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    accept = request.headers.get("accept", "")
    return kind == "application/json" or ("application/json" in accept and "text/html" not in accept)


def _answer(request: Request, service: Signup, status: int, message: str, headers: dict | None = None,
            background: BackgroundTask | None = None, title: str = "") -> Response:
    headers = {**service.cors_headers(request), **(headers or {})}
    if _wants_json(request):
        response: Response = JSONResponse({"ok": status < 400, "message": message}, status_code=status,
                                          headers={"Cache-Control": "no-store", **headers})
    else:
        response = _page(service.config, title or ("Almost done" if status < 400 else "Not subscribed"),
                         [message], status=status, headers=headers)
    response.background = background
    return response


async def _read_fields(request: Request) -> dict[str, str] | str:
    """The submitted fields, or what is wrong with the request."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return "the request is too large"
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if kind == "application/json":
            data = json.loads(body)
            if not isinstance(data, dict):
                return "expected a JSON object like {\"email\": \"you@example.com\"}"
            return {k: v for k, v in data.items() if isinstance(k, str)}
        if kind == "application/x-www-form-urlencoded":
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=20)
            return {k: v[0] for k, v in fields.items()}
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: JSON nested thousands deep
        return "the request body could not be read"
    return "send the form as application/x-www-form-urlencoded or as JSON"


async def subscribe(request: Request) -> Response:
    service = _service(request)
    if not service.enabled:
        return _not_enabled(request)
    origin = request.headers.get("origin")
    if origin and not service.origin_allowed(origin, request):
        return _answer(request, service, 403, "This site may not post to the sign-up form.")
    client = request.client.host if request.client else "?"
    if wait := service.by_client.take(client):
        return _answer(request, service, 429, "Too many sign-ups from here; please try again later.",
                       {"Retry-After": str(math.ceil(wait))})
    try:
        fields = await _read_fields(request)
    except ClientDisconnect:
        return Response(status_code=400)
    if isinstance(fields, str):
        status = 413 if "too large" in fields else 415 if "send the form" in fields else 400
        return _answer(request, service, status, f"Not subscribed: {fields}.")
    if fields.get(HONEYPOT):
        return _answer(request, service, 202, ACCEPTED)  # a bot: the same answer, and nothing happens
    raw, raw_name = fields.get("email"), fields.get("name") or ""
    if not isinstance(raw, str) or address_problem(raw.strip()):
        return _answer(request, service, 400, "Please give a valid email address, like you@example.com.")
    name = clean_name(raw_name) if isinstance(raw_name, str) else None
    if raw_name and not name:
        return _answer(request, service, 400, "The name must be one line of at most 200 characters.")
    address = normalize(raw)
    if wait := service.by_address.take(address.lower()):
        return _answer(request, service, 429, "Too many sign-ups for this address; please try again later.",
                       {"Retry-After": str(math.ceil(wait))})
    service.scheduled += 1
    return _answer(request, service, 202, ACCEPTED, background=BackgroundTask(service.deliver, address, name))


def _token_problem(service: Signup, exc: TokenError) -> Response:
    if isinstance(exc, TokenExpired):
        lines = ["This confirmation link has expired. Please sign up again to get a new one."]
        return _page(service.config, "Link expired", lines, status=410, form="", action="")
    return _page(service.config, "Link not valid", ["This is not a valid confirmation link. Please check that "
                 "you copied all of it, or sign up again."], status=400)


def _open_link(request: Request) -> tuple[Signup, str, str | None] | Response:
    """The service and the link's (address, name), or the page to answer instead."""
    service = _service(request)
    if not service.enabled:
        return _not_enabled(request)
    try:
        address, name = read_token(service.secret, service.list_id, request.path_params["token"])
    except TokenError as exc:
        return _token_problem(service, exc)
    return service, address, name


async def confirm_page(request: Request) -> Response:
    """GET changes nothing: mail scanners and link previews follow every link."""
    opened = _open_link(request)
    if isinstance(opened, Response):
        return opened
    service, address, name = opened
    pub = service.config.publication.name
    return _page(service.config, f"Confirm your subscription to {pub}",
                 [f"Press the button to subscribe {address} to {pub}."], form="confirm", action="")


async def confirm(request: Request) -> Response:
    opened = _open_link(request)
    if isinstance(opened, Response):
        return opened
    service, address, name = opened
    pub = service.config.publication.name
    try:
        result = await store_thread(service.config.store).call(_confirm, address, name)
    except StoreError as exc:  # read-only, full or busy: the link still works later
        log.error("sign-up: could not confirm: %s", exc)
        return _page(service.config, "Try again later", [
            "Your subscription could not be saved just now. Please open the link again in a while."], status=503)
    if result == "blocked":
        # Only the holder of the link sees this; the sign-up answer never says it.
        reply = service.config.sender.reply_to or service.config.sender.address
        return _page(service.config, "Not subscribed", [
            f"We cannot subscribe {address} to {pub} again from this page.",
            f"If you want to receive it, please write to {reply}."], status=409)
    return _page(service.config, "You are subscribed",
                 [f"Thank you: {address} is now subscribed to {pub}."])
