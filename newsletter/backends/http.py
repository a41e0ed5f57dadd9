"""What every HTTP email API backend shares; a provider module only builds its request
and reads its answer (the django-anymail shape).

Here, once for all providers: the httpx client (one per send, its connections reused),
timeouts, the number of requests in flight (one worker each), a requests-per-second
limit shared by the workers, retries, error decoding, and the API key check.

No blind retries. A request is sent again on its own only when it certainly did not
reach the provider, or when an idempotency key makes a repeat harmless:

    what happened                                  retried by the worker?  if not, or out of tries
    ---------------------------------------------  ----------------------  ------------------------
    ConnectError, ConnectTimeout, PoolTimeout,     yes, with backoff       deferred (later pass/run)
    ProxyError: no connection to the provider
    WriteError, WriteTimeout: the body never       yes, with backoff       deferred
    arrived whole (its Content-Length was not
    met), and no provider acts on half a body
    429 (Retry-After, SendGrid X-RateLimit-Reset)  yes, waits as told      deferred (at that time)
    ReadTimeout, ReadError, RemoteProtocolError:   only with an            uncertain: never resent by
    the body went out, the answer was lost         idempotency key         itself (send --resend-uncertain)
    5xx: the provider may have acted before        only with an            uncertain
    failing                                        idempotency key
    401, 403, 404 (key, sender, domain, URL)       no                      the run stops (sender)
    other 4xx                                      no                      the run stops (message), or
                                                                           fails the one recipient it names

Only Resend has an Idempotency-Key (``idempotent``): the same key and body get the first
answer again without a second send, so its timeouts and 5xx are retried (see resend.py).
Each provider module classifies its own error answers (``refusal``) and per-message
results into outcome.Outcome, with the fault (recipient, message, sender, server), a
``code`` ("SES MessageRejected", "Postmark 406") and the provider's own words; outcome.py
decides what each does to the ledger and the run. The first request of a run goes out
alone: a refused key or sender costs one request, not one per worker.

One transactional message (a sign-up confirmation, not an issue) goes through the same
worker, the same rules and the same ``refusal``, to the provider's single-message endpoint:
``open_single_worker`` gives a worker whose request is the provider's ``build_single``.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable

import httpx

from ..config import Api
from ..errors import SendError
from ..message import Message
from ..outcome import MESSAGE, RECIPIENT, SENDER, SERVER, uncertain
from .base import DEFERRED, FAILED, SENT, Backend, Outcome, Worker

MAX_RETRY_AFTER = 120.0  # a longer wait than this defers the batch instead
# Raised before the provider can have seen the whole request: safe to send again.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError,
            httpx.WriteError, httpx.WriteTimeout)


@dataclass
class ApiRequest:
    method: str
    path: str
    json: Any = None
    data: Any = None  # form fields, a list of (name, value) pairs
    content: bytes | JsonArray | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json_array(cls, path: str, objects: list[list[bytes]], headers: dict[str, str]) -> "ApiRequest":
        body = JsonArray(objects)
        return cls("POST", path, content=body, headers={**headers, "Content-Type": "application/json",
                                                        "Content-Length": str(body.length)})


def json_body(response: httpx.Response) -> dict:
    """The answer's JSON object, or {} for anything else: a 2xx is accepted whatever its body."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def json_object(fields: dict, encoded_strings: dict[str, list[bytes]]) -> list[bytes]:
    """A JSON object, in pieces: `fields`, plus string members whose values come already
    encoded (the inside of a JSON string, in pieces, as Message.html_json gives)."""
    head = json.dumps(fields, ensure_ascii=False)[:-1]
    parts = [head.encode("utf-8")]
    separator = "," if fields else ""
    for name, pieces in encoded_strings.items():
        parts.append(f'{separator}{json.dumps(name)}:"'.encode("utf-8"))
        parts += pieces
        parts.append(b'"')
        separator = ","
    parts.append(b"}")
    return parts


class JsonArray:
    """A request body that is a JSON array of json_object's pieces, written about CHUNK
    bytes at a time: a Postmark batch is 20 MB, and joining it whole kept two or three
    copies of it for each request in flight. Its length is known before it is sent (no
    chunked encoding), and it can be sent again (a retry)."""

    CHUNK = 1 << 20  # bytes: big enough that writing is not a wait per message, small enough to be no burden

    def __init__(self, objects: list[list[bytes]]):
        self.objects = objects
        self.length = 2 + max(len(objects) - 1, 0) + sum(len(p) for pieces in objects for p in pieces)

    def items(self):
        parts, size = [b"["], 1
        for index, pieces in enumerate(self.objects):
            if index:
                parts.append(b",")
            parts += pieces
            size += sum(map(len, pieces))
            if size >= self.CHUNK:
                yield b"".join(parts)
                parts, size = [], 0
        parts.append(b"]")
        yield b"".join(parts)

    async def __aiter__(self):
        for item in self.items():
            yield item

    def __bytes__(self) -> bytes:
        return b"".join(self.items())


class RateLimiter:
    """Keeps request starts at least 1/rate seconds apart, across all workers. A slot is
    given at most that often, and also no sooner than that after the last request really
    left (`sent`, from httpx's request hook): a request held up by other work after its
    slot must not let the next one through on its heels."""

    MARGIN = 1.08  # requests can arrive up to a few tens of ms off their start: keep clear

    def __init__(self, per_second: float):
        self.interval = self.MARGIN / per_second if per_second > 0 else 0.0
        self.next = 0.0
        self.last_sent = float("-inf")

    async def wait(self) -> None:
        if not self.interval:
            return
        while True:
            now = time.monotonic()
            start = max(self.next, self.last_sent + self.interval)
            if start <= now:
                break
            await asyncio.sleep(start - now)
        self.next = now + self.interval

    async def sent(self, request: httpx.Request | None = None) -> None:
        self.last_sent = max(self.last_sent, time.monotonic())


class HttpBackend(Backend):
    """Subclasses set `name`, `title`, and fill in `build` and `results`."""

    title = "API"  # how the provider is named in messages: "Postmark API response 422: ..."
    needs_key = True
    idempotent = False  # a repeated request cannot send twice (Resend's Idempotency-Key)

    def __init__(self, settings: Api):
        self.settings = settings
        self.connections = settings.requests_in_flight
        self.batch_size = settings.batch_size
        self.limiter = RateLimiter(settings.requests_per_second)
        self.client: httpx.AsyncClient | None = None
        self.gate: asyncio.Event | None = None  # open once the run's first request is answered
        self.probing = False
        self.first_refusal: Outcome | None = None  # the first answer stopped the run

    # -- what a provider fills in ---------------------------------------------------------------

    def auth(self) -> dict[str, str] | httpx.Auth:
        return {"Authorization": f"Bearer {self.settings.api_key}"}

    def build(self, messages: list[Message]) -> ApiRequest:
        raise NotImplementedError

    def results(self, response: httpx.Response, messages: list[Message]) -> list[Outcome]:
        """A 2xx answer: one Outcome per message (by default all accepted)."""
        return [Outcome(SENT, f"{response.status_code} accepted")] * len(messages)

    def error_text(self, response: httpx.Response) -> str:
        """The provider's own words from an error answer."""
        try:
            body = response.json()
        except ValueError:
            return _plain(response.text)[:500] or response.reason_phrase
        if isinstance(body, dict):
            for key in ("message", "Message", "errors", "error"):
                if key in body:
                    value = body[key]
                    return "; ".join(e.get("message", str(e)) if isinstance(e, dict) else str(e)
                                     for e in value) if isinstance(value, list) else str(value)
        return json.dumps(body)[:500]

    def refusal(self, response: httpx.Response, messages: list[Message]) -> tuple[Outcome, int | None]:
        """What an error answer means, and the index of the one message it concerns (None:
        the whole request). A DEFERRED outcome is retried by the worker. Providers refine it
        and fall back on this."""
        status = response.status_code
        text = self.error_text(response)
        if status == 429:
            return Outcome(DEFERRED, self.reply(status, text), SERVER, retry_after=self.retry_after(response),
                           code=f"{self.title} 429"), None
        if status >= 500:
            return self.lost_answer(self.reply(status, text), f"{self.title} HTTP {status}"), None
        if status in (401, 403, 404) or status < 400:
            # the key, the sender, the domain or the URL: every batch would get the same answer
            return self.refused(SENDER, status, text), None
        index = self.named_recipient(text, messages)
        if index is not None:
            return self.refused(RECIPIENT, status, text), index
        return self.refused(MESSAGE, status, text), None  # the request's shape: the same for every batch

    def reply(self, status: int, text: str) -> str:
        return f"{self.title} API response {status}: {text}"

    def refused(self, fault: str, status: int, text: str, code: str | None = None, suppress: bool = False) -> Outcome:
        return Outcome(FAILED, self.reply(status, text), fault, suppress=suppress, code=code or f"{self.title} {status}")

    def lost_answer(self, reply: str, code: str) -> Outcome:
        """The request went out and no clear answer came back: it may have been delivered."""
        if self.idempotent:
            return Outcome(DEFERRED, reply, SERVER, code=code, may_have_gone=True)  # the same key: harmless
        return uncertain(f"{reply}; it may have been delivered", code)

    @staticmethod
    def named_recipient(text: str, messages: list[Message]) -> int | None:
        """The index of the one message whose address the provider's words name, if exactly one."""
        # the whole address, not a part of another ("s@x.com" inside "news@x.com")
        found = [i for i, m in enumerate(messages)
                 if re.search(rf"(?<![\w.+%-]){re.escape(m.recipient)}(?![\w-]|\.[\w-])", text, re.I)]
        return found[0] if len(found) == 1 else None

    def sign(self, request: httpx.Request) -> httpx.Request:
        """A last look at the finished request (SES signs it here)."""
        return request

    # -- one transactional message (a sign-up confirmation) --------------------------------------

    def build_single(self, message) -> ApiRequest:
        """The request for one transactional message to the provider's single-message
        endpoint; `message` has sender, sender_name, recipient, name, display_from,
        display_to, subject, text, html, reply_to, message_id, headers() and data."""
        raise NotImplementedError

    def single_results(self, response: httpx.Response, messages: list) -> list[Outcome]:
        """A 2xx answer to build_single's request."""
        return [Outcome(SENT, f"{response.status_code} accepted")]

    async def open_single_worker(self) -> Worker:
        """A worker that sends one transactional message a call (its `send`)."""
        await self.open_worker()  # the client, the key check, the provider's own checks
        return SingleWorker(self)

    # -- the shared machinery --------------------------------------------------------------------

    def base_url(self) -> str:
        if not self.settings.base_url:
            raise SendError(f"{self.name}: no base_url set")
        return self.settings.base_url

    async def open_worker(self) -> Worker:
        if self.client is None:
            if self.needs_key and not self.settings.api_key:
                raise SendError(f"{self.name}: NEWSLETTER_{self.name.upper()}_API_KEY is not set")
            auth = self.auth()
            self.client = httpx.AsyncClient(
                base_url=self.base_url(),
                headers=auth if isinstance(auth, dict) else None,
                auth=auth if isinstance(auth, httpx.Auth) else None,
                timeout=self.settings.timeout,
                event_hooks={"request": [self.limiter.sent]},
                limits=httpx.Limits(max_connections=self.connections, max_keepalive_connections=self.connections),
                follow_redirects=False,
            )
            self.gate, self.probing, self.first_refusal = asyncio.Event(), False, None
        return HttpWorker(self)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def describe(self) -> str:
        s = self.settings
        rate = f", {s.requests_per_second:g} requests/s" if s.requests_per_second else ""
        return f"{self.name} {self.base_url()} ({s.requests_in_flight} in flight, {s.batch_size} a request{rate})"

    def retry_after(self, response: httpx.Response) -> float | None:
        value = response.headers.get("retry-after")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            pass
        else:  # "inf" or "nan" would leave the batch waiting for ever
            return max(0.0, seconds) if math.isfinite(seconds) else None
        try:  # or an HTTP date
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None  # not a value we understand: back off as for any other retry
        return max(0.0, when.timestamp() - time.time())


class HttpWorker(Worker):
    def __init__(self, backend: HttpBackend):
        self.backend = backend

    # What the request holds and what its 2xx means: an issue's batch here, one message in SingleWorker.
    def build(self, messages: list[Message]) -> ApiRequest:
        return self.backend.build(messages)

    def results(self, response: httpx.Response, messages: list[Message]) -> list[Outcome]:
        return self.backend.results(response, messages)

    async def send(self, message: Message) -> Outcome:
        return (await self.send_batch([message]))[0]

    async def send_batch(self, messages: list[Message], ready: Awaitable | None = None,
                         after: Message | None = None) -> list[Outcome]:
        if ready is not None:
            await ready  # the batch is `sending` in the ledger: a request is sent whole, so no sooner
        backend = self.backend
        gate = backend.gate
        if gate is not None:  # the run's first request goes alone; the others wait for its answer
            if not backend.probing:
                backend.probing = True
                try:
                    outcomes = await self.request(messages)
                    backend.first_refusal = next((o for o in outcomes if o.stops_run), None)
                    return outcomes
                finally:
                    backend.gate = None
                    gate.set()
            await gate.wait()
            if (refusal := backend.first_refusal) is not None:  # the run stops: this batch was not sent
                return [Outcome(refusal.state, f"not sent: {refusal.reply}", refusal.fault, code=refusal.code)
                        ] * len(messages)
        return await self.request(messages)

    async def request(self, messages: list[Message]) -> list[Outcome]:
        backend, settings = self.backend, self.backend.settings
        spec = None
        outcome = Outcome(DEFERRED, "not sent", SERVER)
        for attempt in range(settings.max_retries + 1):
            if attempt:
                wait = outcome.retry_after
                delay = wait if wait is not None else settings.retry_delay * 2 ** (attempt - 1)
                await asyncio.sleep(delay * random.uniform(1.0, 1.25))
            # The request is built (and signed) only once this worker holds a slot: with a
            # rate limit, one worker builds at a time and its request leaves at once,
            # instead of everyone's building holding up the request whose turn it is.
            await backend.limiter.wait()
            spec = spec or self.build(messages)
            request = backend.sign(backend.client.build_request(
                spec.method, spec.path, json=spec.json, data=spec.data, content=spec.content, headers=spec.headers))
            try:
                response = await backend.client.send(request)
            except NOT_SENT as exc:
                outcome = Outcome(DEFERRED, f"{backend.title}: not sent: {_describe(exc, settings.timeout)}", SERVER,
                                  code=f"{backend.title} unreachable")
                continue
            except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:  # our settings or our request
                raise SendError(f"{backend.name}: cannot send to {backend.base_url()}: {exc}") from exc
            except (httpx.TransportError, httpx.DecodingError) as exc:  # the request went out; its answer was lost
                # (or came back unreadable: a body that says gzip and is not)
                what = "timeout" if isinstance(exc, httpx.TimeoutException) else \
                    "unreadable answer" if isinstance(exc, httpx.DecodingError) else "connection lost"
                outcome = backend.lost_answer(f"{backend.title}: {_describe(exc, settings.timeout)} after the "
                                              "request went out", f"{backend.title} {what}")
                if outcome.state == DEFERRED:
                    continue
                return [outcome] * len(messages)
            if response.is_success:
                if (page := _not_json(response)) is not None:  # a proxy, a portal, a wrong base_url
                    outcome = backend.lost_answer(
                        f"{backend.title}: a {response.status_code} answer that is not the provider's answer "
                        f"({page}); check base_url", f"{backend.title} not JSON")
                    if outcome.state == DEFERRED:
                        continue
                    return [outcome] * len(messages)
                return self.results(response, messages)
            outcome, index = backend.refusal(response, messages)
            if index is not None:  # one recipient refused, and with it the request: the others go again now
                others = await self.request(messages[:index] + messages[index + 1:]) if len(messages) > 1 else []
                return others[:index] + [outcome] + others[index:]
            if outcome.state != DEFERRED:
                return [outcome] * len(messages)
            if outcome.retry_after is not None and outcome.retry_after > MAX_RETRY_AFTER:
                break
        tries = f"{attempt + 1} attempt{'s' * (attempt > 0)}"
        return [Outcome(DEFERRED, f"{outcome.reply} (after {tries})", SERVER, retry_after=outcome.retry_after,
                        code=outcome.code, may_have_gone=outcome.may_have_gone)] * len(messages)


class SingleWorker(HttpWorker):
    """One transactional message a request, to the provider's single-message endpoint;
    retries, refusals and outcomes exactly as for a batch of one."""

    def build(self, messages: list) -> ApiRequest:
        [message] = messages
        return self.backend.build_single(message)

    def results(self, response: httpx.Response, messages: list) -> list[Outcome]:
        return self.backend.single_results(response, messages)


_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.I | re.S)
_TAG = re.compile(r"<[^>]*>")


def _plain(text: str) -> str:
    """An answer's words: an HTML page (a proxy's 502, a portal) by its title, or its text."""
    text = text.strip()
    if text[:1] == "<":
        title = _TITLE.search(text)
        text = title.group(1) if title and title.group(1).strip() else _TAG.sub(" ", text)
    return " ".join(text.split())


def _not_json(response: httpx.Response) -> str | None:
    """Every provider answers a 2xx with JSON or nothing: anything else did not come from it
    (its words, shortened), and what became of the request is not known."""
    body = response.content.strip()
    if not body:
        return None
    try:
        json.loads(body)
    except ValueError:
        return f"{response.headers.get('content-type', 'no Content-Type')}: {_plain(response.text)[:80]!r}"
    return None


def _describe(exc: httpx.TransportError | httpx.DecodingError, timeout: float) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout:g} s ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
