"""What every HTTP email API backend shares; a provider module only builds its request
and reads its answer (the django-anymail shape).

Here, once for all providers: the httpx client (one per send, its connections reused),
timeouts, the number of requests in flight (one worker each), a requests-per-second
limit shared by the workers, retries, error decoding, and the API key check.

Retries: 429 waits for Retry-After (or the provider's reset header) when it says, else
backs off; 5xx, timeouts and connection errors back off exponentially with jitter, up to
``max_retries``. Beware that a provider may have accepted a request whose answer was
lost: only Resend's Idempotency-Key makes such a retry safe (see resend.py). Other 4xx:
the batch's recipients fail with the provider's own words, and are not retried. After the
last retry the batch is deferred, for the next pass or run. 401 and 403 (and what a
provider says is a settings problem, like Mailgun's unknown domain) stop the run: every
other batch would fail the same way, so everyone else stays pending.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..config import Api
from ..errors import SendError
from ..message import Message
from .base import DEFERRED, FAILED, SENT, Backend, Outcome, Worker

MAX_RETRY_AFTER = 120.0  # a longer wait than this defers the batch instead
RETRY, STOP, FAIL = "retry", "stop", "fail"


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

    def __init__(self, settings: Api):
        self.settings = settings
        self.connections = settings.requests_in_flight
        self.batch_size = settings.batch_size
        self.limiter = RateLimiter(settings.requests_per_second)
        self.client: httpx.AsyncClient | None = None

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
            return response.text.strip()[:500] or response.reason_phrase
        if isinstance(body, dict):
            for key in ("message", "Message", "errors", "error"):
                if key in body:
                    value = body[key]
                    return "; ".join(e.get("message", str(e)) if isinstance(e, dict) else str(e)
                                     for e in value) if isinstance(value, list) else str(value)
        return json.dumps(body)[:500]

    def verdict(self, response: httpx.Response) -> str:
        """What an error answer means: RETRY (later, it may pass), STOP (a settings
        problem: every batch would fail alike, so end the run with the rest pending), or
        FAIL (this batch's recipients, for good). Providers refine it."""
        if response.status_code == 429 or response.status_code >= 500:
            return RETRY
        if response.status_code in (401, 403):
            return STOP
        return FAIL

    def sign(self, request: httpx.Request) -> httpx.Request:
        """A last look at the finished request (SES signs it here)."""
        return request

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
            return max(0.0, float(value))
        except ValueError:
            pass
        try:  # or an HTTP date
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None  # not a value we understand: back off as for any other retry
        return max(0.0, when.timestamp() - time.time())


class HttpWorker(Worker):
    def __init__(self, backend: HttpBackend):
        self.backend = backend

    async def send(self, message: Message) -> Outcome:
        return (await self.send_batch([message]))[0]

    async def send_batch(self, messages: list[Message]) -> list[Outcome]:
        backend, settings = self.backend, self.backend.settings
        spec = None
        reason, wait = "no answer", None
        for attempt in range(settings.max_retries + 1):
            if attempt:
                delay = wait if wait is not None else settings.retry_delay * 2 ** (attempt - 1)
                await asyncio.sleep(delay * random.uniform(1.0, 1.25))
            wait = None
            # The request is built (and signed) only once this worker holds a slot: with a
            # rate limit, one worker builds at a time and its request leaves at once,
            # instead of everyone's building holding up the request whose turn it is.
            await backend.limiter.wait()
            spec = spec or backend.build(messages)
            request = backend.sign(backend.client.build_request(
                spec.method, spec.path, json=spec.json, data=spec.data, content=spec.content, headers=spec.headers))
            try:
                response = await backend.client.send(request)
            except httpx.TimeoutException:
                reason = f"no answer within {settings.timeout:g} s"
                continue
            except httpx.TransportError as exc:
                reason = f"connection failed: {exc or type(exc).__name__}"
                continue
            status = response.status_code
            if 200 <= status < 300:
                return backend.results(response, messages)
            text = backend.error_text(response)
            reason = f"{backend.title} API response {status}: {text}"
            verdict = backend.verdict(response)
            if verdict == STOP:
                what = "the API key (or the sender) was refused" if status in (401, 403) else "the settings are wrong"
                raise SendError(f"{backend.name}: {what}: {reason}")
            if verdict == FAIL:
                return [Outcome(FAILED, reason)] * len(messages)
            wait = backend.retry_after(response)
            if wait is not None and wait > MAX_RETRY_AFTER:
                break
        tries = f"{attempt + 1} attempt{'s' * (attempt > 0)}"
        return [Outcome(DEFERRED, f"{reason} (after {tries})", retry_after=wait)] * len(messages)

