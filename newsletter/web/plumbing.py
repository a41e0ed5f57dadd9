"""The service's plumbing, the same for every route: a limit on request bodies, one JSON
access-log line per request, and one store connection per worker thread.

Access log lines hold the method, the path with anything secret-looking replaced by "…",
the status and the time taken. Never the query string (confirmation and unsubscribe
tokens may travel there), never an address, and never the client's IP: the store keeps
when each address unsubscribed to the second, so a line with time and IP would tie a
reader's IP to their address. The TLS proxy in front keeps its own log for abuse.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse

from ..store import Store

access_log = logging.getLogger("newsletter.access")

REDACTED = "…"
# A path parameter is logged only when it is a plain lower-case word (a provider's name);
# a token, an address or anything else becomes "…", and so does one named like a secret.
_PLAIN = re.compile(r"[a-z][a-z0-9_-]{0,23}\Z")
_SECRET_NAMES = ("token", "key", "secret", "email", "address")


def setup_access_log(stream=None) -> None:
    """One JSON object a line, on stderr (uvicorn's own access log is off: it prints paths whole)."""
    if access_log.handlers:
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False


def loggable_path(scope) -> str:
    """The request's path with its secrets taken out (see the module's docstring)."""
    segments = scope.get("path", "").split("/")
    params = scope.get("path_params")
    if params is None or scope.get("endpoint") is None:
        # No route matched: keep the first segment if it is a plain word, hide the rest.
        return "/".join(s if i < 2 and _PLAIN.match(s) or not s else REDACTED for i, s in enumerate(segments))
    hidden = {str(v) for k, v in params.items()
              if any(n in k.lower() for n in _SECRET_NAMES) or not _PLAIN.match(str(v))}
    return "/".join(REDACTED if s in hidden else s for s in segments)


class AccessLog:
    """Pure ASGI (no BaseHTTPMiddleware): it must not buffer bodies or change streaming."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]  # what the server sends if the app fails before answering

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            access_log.info(json.dumps({
                "method": scope.get("method"), "path": loggable_path(scope), "status": status[0],
                "ms": round((time.perf_counter() - start) * 1000, 2)}, ensure_ascii=False))


class BodyLimit:
    """413 for a body over `max_body` bytes: at once when Content-Length says so, and while
    reading otherwise (chunked, or a client that lies), before any handler has seen it whole."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await PlainTextResponse("Bad Content-Length.\n", 400)(scope, receive, send)
            if int(length) > self.max_body:
                return await self._too_large(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    # Starlette's exception middleware turns this into the 413 response.
                    raise HTTPException(413, self._words())
            return message

        await self.app(scope, counted, send)

    def _words(self) -> str:
        return f"The request body is larger than this service takes ({self.max_body} bytes).\n"

    async def _too_large(self, scope, receive, send):
        await PlainTextResponse(self._words(), 413, headers={"Connection": "close"})(scope, receive, send)


_local = threading.local()


def thread_store(path: str | Path) -> Store:
    """This thread's connection to the store, opened on first use and kept: opening one per
    request costs more than an unsubscribe. Call only from a worker thread
    (run_in_threadpool), never on the event loop: a write may wait up to the store's 30 s
    busy timeout while a send commits."""
    stores = getattr(_local, "stores", None)
    if stores is None:
        stores = _local.stores = {}
    key = str(path)
    store = stores.get(key)
    if store is None:
        store = stores[key] = Store(path)
    return store
