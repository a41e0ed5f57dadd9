"""The service's plumbing, the same for every route: a limit on request bodies, one JSON
access-log line per request, and the store's own thread.

Access log lines hold the method, the path with anything secret-looking replaced by "…",
the status and the time taken. Never the query string (confirmation and unsubscribe
tokens may travel there), never an address, and never the client's IP: the store keeps
when each address unsubscribed to the second, so a line with time and IP would tie a
reader's IP to their address. The TLS proxy in front keeps its own log for abuse.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import re
import sys
import threading
import time

from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse

from ..store import Store, open_store

access_log = logging.getLogger("newsletter.access")

REDACTED = "…"
MAX_HEADERS, MAX_HEADER_BYTES = 100, 16384  # a browser sends about 20 headers, 2 KB
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
    # a whole segment, or one that only holds it ("/u/{token}.html"): the segment goes
    return "/".join(REDACTED if s in hidden or any(h and h in s for h in hidden) else s for s in segments)


class Plumbing:
    """The access log, the body limit and the body's deadline, in one pure ASGI layer (not BaseHTTPMiddleware,
    which would buffer bodies and costs more a request).

    413 for a body over `max_body` bytes: at once when Content-Length says so, and while
    reading otherwise (chunked, or a client that lies), before a handler has seen it whole.
    `larger` gives paths that take more, by prefix (a provider's webhook batch is megabytes)."""

    def __init__(self, app, max_body: int, larger: dict[str, int] | None = None, read_timeout: float = 0):
        self.app, self.default_max, self.larger = app, max_body, larger or {}
        self.read_timeout = read_timeout  # for the whole body; 0: none

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        max_body = next((n for prefix, n in self.larger.items() if path.startswith(prefix)), self.default_max)
        start = time.perf_counter()
        status = 500  # what the server sends if the app fails before answering
        seen = 0

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        deadline = start + self.read_timeout

        async def counted():
            nonlocal seen
            if not self.read_timeout:
                message = await receive()
            else:
                # A client that starts a body and never finishes it would hold its handler
                # (and the connection) forever.
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.perf_counter(), 0.001))
                except asyncio.TimeoutError:
                    raise HTTPException(408, "The request body took too long to arrive.\n",
                                        headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_body:
                    # Starlette's exception middleware turns this into the 413 response.
                    raise HTTPException(413, self._words(max_body))
            return message

        try:
            length = None
            headers = scope.get("headers") or ()
            for name, value in headers:
                if name == b"content-length":
                    length = value
            if len(headers) > MAX_HEADERS or sum(len(n) + len(v) for n, v in headers) > MAX_HEADER_BYTES:
                # h11 limits only a head that arrives in pieces; one that arrives whole is not
                await PlainTextResponse("Too many or too large headers.\n", 431, headers={"Connection": "close"})(
                    scope, receive, send_and_note)
            elif length is not None and not length.isdigit():
                await PlainTextResponse("Bad Content-Length.\n", 400)(scope, receive, send_and_note)
            elif length is not None and int(length) > max_body:
                await PlainTextResponse(self._words(max_body), 413, headers={"Connection": "close"})(
                    scope, receive, send_and_note)
            else:
                await self.app(scope, counted, send_and_note)
        finally:
            access_log.info(json.dumps({
                "method": scope.get("method"), "path": loggable_path(scope), "status": status,
                "ms": round((time.perf_counter() - start) * 1000, 2)}, ensure_ascii=False))

    @staticmethod
    def _words(max_body: int) -> str:
        return f"The request body is larger than this service takes ({max_body} bytes).\n"


class StoreThread:
    """The store's one thread and connection in this process: handlers `await
    store_thread(path).call(fn, *args)` and fn(store, *args) runs there, so the event loop
    never waits on SQLite (a write may wait up to the 30 s busy timeout while a `send`
    commits). Calls are taken in rounds, everything queued at once, run in one transaction
    (group commit: one commit for the round; the store's methods join it) and answered in
    one wake-up of the loop, each only after that commit. If anything in a round fails, the
    round is rolled back and each call run again on its own, so a failure is only its own.
    Measured (bench/serve.py): run_in_threadpool with a connection per thread did 1,400
    unsubscribes/s (32 threads slept in SQLite's busy handler, 1, 2, 5 ms ..., waiting for
    each other); this thread, a commit per call, 4,000; a commit per round, 4,800."""

    def __init__(self, settings):
        self.settings = settings
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="store", daemon=True)
        self.thread.start()

    async def call(self, fn, *args):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queue.put((fn, args, loop, future))
        return await future

    def _run(self) -> None:
        store: Store | None = None
        while True:
            calls = [self.queue.get()]
            while True:
                try:
                    calls.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            answers: dict = {}
            try:
                if store is None:
                    store = open_store(self.settings)
                # Group commit: the round in one transaction, so one commit (and one WAL
                # sync point) for all; answers go out only after it.
                with store.transaction():
                    results = [(future, True, fn(store, *args)) for fn, args, loop, future in calls]
            except BaseException:
                results = None  # rolled back: each call again on its own, so one failure is only its own
            for i, (fn, args, loop, future) in enumerate(calls):
                if results is not None:
                    answers.setdefault(loop, []).append(results[i])
                    continue
                try:
                    if store is None:
                        store = open_store(self.settings)
                    answers.setdefault(loop, []).append((future, True, fn(store, *args)))
                except BaseException as exc:  # handed to the handler, which says 503
                    answers.setdefault(loop, []).append((future, False, exc))
            if store is not None and not store.healthy():  # the database server went away: open it again
                store.close()
                store = None
            for loop, done in answers.items():
                try:
                    loop.call_soon_threadsafe(_settle, done)
                except RuntimeError:  # that loop has closed: nobody is waiting
                    pass


def _settle(done) -> None:
    for future, ok, value in done:
        if future.done():  # the request was cancelled (client gone)
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


_threads: dict[str, StoreThread] = {}
_threads_lock = threading.Lock()


def store_thread(settings) -> StoreThread:
    """The thread for the store that [store] names (path or url)."""
    where = str(settings.url or settings.path)
    with _threads_lock:
        found = _threads.get(where)
        if found is None:
            found = _threads[where] = StoreThread(settings)
        return found
