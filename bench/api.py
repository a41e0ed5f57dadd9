"""Benchmark: how fast `newsletter send` pushes messages through each HTTP email API backend, against its ceiling.

Each backend (SendGrid, Mailgun, Postmark, Resend, Amazon SES) sends issues/2021-08-13-china-taliban.yaml
(about 40 KB a message) to a loopback **stand-in** for the provider on 127.0.0.1, which:

* answers like the provider, with the smallest valid 2xx answer, 20 ms after the whole request
  arrived (or once it is parsed, if that takes longer): SendGrid 202 with an empty body and
  X-Message-Id; Mailgun 200 ``{"id", "message"}``; Postmark 200 with one ``{"ErrorCode": 0, ...}``
  a message; Resend 200 ``{"data": [{"id"}, ...]}`` (a repeated Idempotency-Key gets the first
  answer again and counts nothing, as on Resend); SES 200 ``{"MessageId"}``;
* checks the key (Bearer, Basic ``api:KEY``, X-Postmark-Server-Token, an AWS4-HMAC-SHA256
  Authorization header) and enforces each batch limit, refusing a request over it with the
  provider's error (SendGrid 400 over 1,000 personalizations or recipients, Mailgun 400 over
  1,000 recipients, Postmark 422 ErrorCode 410 over 500 messages, Resend 422 over 100 emails,
  SES 400 over 50 recipients); a self-check sends one over-limit request of each kind first;
* counts every recipient address it is given, so that after each run we check it saw every
  message exactly once;
* runs in a SEPARATE process (``bench/api.py --stand-in``), so its CPU is not our GIL's: an
  asyncio server (``asyncio.start_server`` and a minimal HTTP/1.1 keep-alive parser for
  Content-Length bodies) by default, or ``--server threads`` for http.server's
  ThreadingHTTPServer. Its CPU time is printed next to ours, to show which side was the limit.

Ours: a real ``python -m newsletter send ISSUE --config TMP/newsletter.toml --backend X`` process
against a fresh store of N subscribers, configured by NEWSLETTER_<PROVIDER>_* variables: base_url
the stand-in, ``requests_in_flight`` 8, ``batch_size`` the provider's default (SendGrid 1,000,
Mailgun 1,000, Postmark 500, Resend 100, SES 1) and ``requests_per_second`` 0 (no limit). Runs:

* sendgrid, mailgun, postmark, resend: N = 100,000 each (``--quick``: 10,000);
* resend again at its default 2 requests/s, 2,000 messages (``--quick``: 1,000), to show the
  limit holds: no more than 2 requests may arrive within any second;
* ses: 2,000 messages (``--quick``: 1,000), one a request, with its rate limit raised from its
  default 14/s (the account's MaxSendRate) to none, so that the 8 requests in flight are the limit;
* ses again at that default 14/s, 140 messages (``--quick``: 70), checked like Resend's.

Figures per run, from the stand-in's clock: messages/s and requests/s over the sending phase,
from the first request's arrival to the last answer; the **ceiling** = min(in_flight x batch /
20 ms, requests_per_second x batch); the ratio achieved / ceiling. The goal is the provider's
published rate limit where one binds: >= 0.9 of it (Resend's 2 requests/s, SES's 14/s). Where
none is published (SendGrid, Mailgun, Postmark, and the unlimited Resend and SES runs) the
figure is the single process's own rate, **client-bound**, or **stand-in-bound** when the
stand-in was the busier side and kept at least 80% of a core busy: the table gives our build rate for comparison
(``MessageFactory.build`` + the provider's ``build`` + ``httpx build_request``, which encodes the
body, + SES's SigV4 signing; the same messages, no network, no ledger; the best of 3 passes over
up to 4,000). The Resend run at 2 requests/s is checked by the most requests arriving within any
second (less 20 ms for timer jitter), goal at most 2; SES's at 14/s likewise, at most 14. Also
the peak RSS of the sending process (wait4, in a small launcher process: see LAUNCHER), its
CPU, its whole wall time, and the
stand-in's CPU and per-request figures, to show which side was the limit. Checked after each
run: exit status 0, the ledger holds N ``sent`` rows, and the stand-in counted each of the N
addresses exactly once and refused nothing.

Run it from anywhere with the project's venv python:

    .venv/bin/python bench/api.py                         # full run, a few minutes
    .venv/bin/python bench/api.py --quick                 # 10,000 messages a backend
    .venv/bin/python bench/api.py --backends sendgrid,ses # only these
    .venv/bin/python bench/api.py --profile               # also cProfile each throughput run
    .venv/bin/python bench/api.py --server threads        # the stand-in on http.server instead

Exit status: 0 when everything ran (even if a goal is missed; the table says so), 1 when
something failed to run or a check failed, 2 when the project cannot be imported. Standard
library only, plus the project itself (and httpx, botocore, which it uses). All traffic stays
on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import json
import math
import os
import platform
import pstats
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from common import cpu_model, fresh_copy, ledger_counts, note

ROOT = Path(__file__).resolve().parent.parent
ISSUE = "issues/2021-08-13-china-taliban.yaml"
CONFIG = "newsletter.toml"
SECRET = "bench-secret-not-for-real-use-0123456789abcdef"

PROVIDERS = ("sendgrid", "mailgun", "postmark", "resend", "ses")
BATCH = {"sendgrid": 1000, "mailgun": 1000, "postmark": 500, "resend": 100, "ses": 1}  # defaults = limits
SES_MAX_RECIPIENTS = 50
SES_DEFAULT_RATE = 14.0  # messages a second: a new production account's MaxSendRate
DELAY = 0.020  # the stand-in answers 20 ms after a request arrived
API_KEY = "bench-key-not-a-real-one"
MAILGUN_DOMAIN = "mg.watchman.example"
AWS_KEY_ID, AWS_SECRET = "AKIABENCHNOTREAL0000", "bench-not-a-real-aws-secret"
RATIO_GOAL = 0.9
WINDOW = 1.0 - 0.020  # "requests in any second", less 20 ms for timer jitter
BUILD_SAMPLE, BUILD_PASSES = 4_000, 3  # the client's own build rate: the best of 3 passes over 4,000
STAND_IN_LIFETIME = 4 * 3600.0  # the stand-in exits by itself after this, whatever happens


def fail(message: str, code: int = 1) -> None:
    print(f"bench/api.py: {message}", file=sys.stderr)
    sys.exit(code)


# == the stand-in: runs in its own process (`api.py --stand-in`) ================================

ADDRESS = re.compile(r"reader(\d{7})@example\.com")
ANGLE = re.compile(r"<([^<>]+)>\s*$")


class Refused(Exception):
    def __init__(self, status: int, body: bytes | str | dict | list, headers: list[tuple[str, str]] | None = None):
        self.status = status
        self.body = body if isinstance(body, bytes) else (
            body.encode() if isinstance(body, str) else json.dumps(body).encode())
        self.headers = headers or ([("Content-Type", "application/json")] if not isinstance(body, (bytes, str))
                                   else [("Content-Type", "text/plain")])


FORM_PART = re.compile(rb'Content-Disposition: form-data; name="([^"]+)"\r\n\r\n(.*)\r\n\Z', re.S)


def _form_fields(content_type: str, body: bytes) -> list[tuple[str, str]]:
    """Mailgun's fields, form-urlencoded or multipart/form-data (parts without headers of their own)."""
    if content_type.startswith("application/x-www-form-urlencoded"):
        return parse_qsl(body.decode("ascii"), keep_blank_values=True)
    if not content_type.startswith("multipart/form-data; boundary="):
        raise Refused(400, {"message": "expected form-urlencoded or multipart/form-data fields"})
    delimiter = b"--" + content_type.split("boundary=", 1)[1].encode("ascii")
    parts = body.split(delimiter)
    if parts[0] or parts[-1] != b"--\r\n":
        raise Refused(400, {"message": "malformed multipart body"})
    fields = []
    for part in parts[1:-1]:
        if not (m := FORM_PART.match(part, 2)) or part[:2] != b"\r\n":
            raise Refused(400, {"message": "malformed multipart part"})
        fields.append((m.group(1).decode("ascii"), m.group(2).decode("utf-8")))
    return fields


def _json(value) -> tuple[list[tuple[str, str]], bytes]:
    return [("Content-Type", "application/json")], json.dumps(value, separators=(",", ":")).encode()


class StandIn:
    """What every provider's stand-in shares: routing, the counts, the report. Thread-safe, so
    the same object serves the asyncio server and the threaded one."""

    def __init__(self):
        self.lock = threading.Lock()
        self.serial = 0
        self.reset(0)

    def reset(self, n: int) -> None:
        with self.lock:
            self.n = n
            self.counts = bytearray(n)
            self.unknown = 0
            self.requests: list[tuple[float, int]] = []  # (arrived, messages) of each accepted request
            self.by_provider: dict[str, int] = {}
            self.refused: dict[str, int] = {}
            self.replays = 0
            self.keys: dict[str, tuple[int, list, bytes]] = {}
            self.bytes_in = 0
            self.work = 0.0  # seconds spent parsing and counting
            self.upload = 0.0  # head arrived -> whole body received, summed
            self.latency = 0.0  # whole body received -> answer written, summed
            self.answered = 0
            self.last_answer = 0.0

    # -- one request ----------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes, arrived: float
               ) -> tuple[int, list[tuple[str, str]], bytes, bool]:
        """(status, headers, body, counted): counted requests are answered after the delay."""
        path = urlsplit(target).path
        if path.startswith("/_bench/"):
            return self.control(method, target, body)
        start = time.monotonic()
        provider = _route(path)
        try:
            if provider is None:
                raise Refused(404, {"message": f"no such endpoint: {method} {path}"})
            if method != "POST":
                raise Refused(405, {"message": f"{method} not allowed"})
            status, out_headers, out_body, addresses = getattr(self, provider)(path, headers, body)
        except Refused as exc:
            with self.lock:
                reason = f"{provider or '?'} {exc.status}"
                self.refused[reason] = self.refused.get(reason, 0) + 1
                self.work += time.monotonic() - start
            return exc.status, exc.headers, exc.body, False
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            with self.lock:
                reason = f"{provider} 400 malformed"
                self.refused[reason] = self.refused.get(reason, 0) + 1
            return 400, *_json({"message": f"malformed request: {type(exc).__name__}: {exc}"}), False
        with self.lock:
            counts, n = self.counts, self.n
            for address in addresses:
                m = ADDRESS.fullmatch(address)
                i = int(m.group(1)) if m else -1
                if 0 <= i < n:
                    if counts[i] < 255:
                        counts[i] += 1
                else:
                    self.unknown += 1
            self.requests.append((arrived, len(addresses)))
            self.by_provider[provider] = self.by_provider.get(provider, 0) + 1
            self.bytes_in += len(body)
            self.work += time.monotonic() - start
        return status, out_headers, out_body, True

    def answered_one(self, arrived: float, received: float) -> None:
        now = time.monotonic()
        with self.lock:
            self.upload += received - arrived
            self.latency += now - received
            self.answered += 1
            self.last_answer = max(self.last_answer, now)

    def next_id(self) -> int:
        with self.lock:
            self.serial += 1
            return self.serial

    # -- the providers -------------------------------------------------------------------------

    def sendgrid(self, path, headers, body):
        if headers.get("authorization") != f"Bearer {API_KEY}":
            raise Refused(401, {"errors": [{"message": "The provided authorization grant is invalid, expired, "
                                            "or revoked", "field": None, "help": None}]})
        data = json.loads(body)
        people = data["personalizations"]
        if not isinstance(people, list) or not 1 <= len(people) <= 1000:
            raise Refused(400, {"errors": [{"message": "The personalizations field must have at least 1 and at "
                                            "most 1000 items.", "field": "personalizations", "help": None}]})
        addresses = [to["email"] for p in people for kind in ("to", "cc", "bcc") for to in p.get(kind, ())]
        if len(addresses) > 1000:
            raise Refused(400, {"errors": [{"message": "The total number of recipients must be at most 1000.",
                                            "field": "personalizations", "help": None}]})
        if not (data["from"]["email"] and data["subject"] and data["content"]):
            raise Refused(400, {"errors": [{"message": "from, subject and content are required", "field": None}]})
        return 202, [("X-Message-Id", f"bench{self.next_id():012d}")], b"", addresses

    def mailgun(self, path, headers, body):
        domain = path.split("/")[2]
        if domain != MAILGUN_DOMAIN:
            raise Refused(404, {"message": f"Domain not found: {domain}"})
        expected = "Basic " + base64.b64encode(f"api:{API_KEY}".encode()).decode()
        if headers.get("authorization") != expected:
            raise Refused(401, b"Forbidden")
        fields: dict[str, list[str]] = {}
        for name, value in _form_fields(headers.get("content-type", ""), body):
            fields.setdefault(name, []).append(value)
        to = fields.get("to", [])
        if len(to) > 1000:
            raise Refused(400, {"message": "Too many recipients; max is 1000"})
        if not (to and fields.get("from") and fields.get("subject") and (fields.get("text") or fields.get("html"))):
            raise Refused(400, {"message": "'from', 'to', 'subject' and 'text' or 'html' are required"})
        addresses = [m.group(1) if (m := ANGLE.search(t)) else t.strip() for t in to]
        variables = json.loads(fields["recipient-variables"][0]) if "recipient-variables" in fields else {}
        if missing := [a for a in addresses if a not in variables]:
            raise Refused(400, {"message": f"recipient-variables has no entry for {missing[0]}"})
        out = _json({"id": f"<bench{self.next_id():012d}@{domain}>", "message": "Queued. Thank you."})
        return 200, *out, addresses

    def postmark(self, path, headers, body):
        if headers.get("x-postmark-server-token") != API_KEY:
            raise Refused(401, {"ErrorCode": 10, "Message": "The Server Token you provided was invalid."})
        items = json.loads(body)
        if not isinstance(items, list) or not items:
            raise Refused(422, {"ErrorCode": 402, "Message": "Expected a JSON array of messages."})
        if len(items) > 500:
            raise Refused(422, {"ErrorCode": 410, "Message": "Too many batch messages (at most 500)."})
        addresses, answers = [], []
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.0000000+00:00", time.gmtime())
        base = self.next_id()
        for i, item in enumerate(items):
            if not (item["From"] and item["Subject"] and (item.get("HtmlBody") or item.get("TextBody"))):
                raise Refused(422, {"ErrorCode": 300, "Message": "Invalid email request"})
            to = item["To"]
            addresses.append(m.group(1) if (m := ANGLE.search(to)) else to.strip())
            answers.append({"ErrorCode": 0, "Message": "OK", "MessageID": f"bench-{base:08d}-{i:04d}",
                            "SubmittedAt": stamp, "To": to})
        return 200, *_json(answers), addresses

    def resend(self, path, headers, body):
        if headers.get("authorization") != f"Bearer {API_KEY}":
            raise Refused(401, {"statusCode": 401, "message": "API key is invalid", "name": "validation_error"})
        key = headers.get("idempotency-key")
        with self.lock:
            first = self.keys.get(key) if key else None
            self.replays += first is not None
        if first:
            return *first, []  # the first answer again: nothing is sent twice
        items = json.loads(body)
        if not isinstance(items, list) or not items:
            raise Refused(422, {"statusCode": 422, "message": "Expected an array of emails",
                                "name": "validation_error"})
        if len(items) > 100:
            raise Refused(422, {"statusCode": 422, "message": "Too many emails in the batch: at most 100",
                                "name": "validation_error"})
        addresses = []
        for item in items:
            if not (item["from"] and item["subject"] and (item.get("html") or item.get("text"))):
                raise Refused(422, {"statusCode": 422, "message": "Missing field", "name": "validation_error"})
            for to in item["to"]:
                addresses.append(m.group(1) if (m := ANGLE.search(to)) else to.strip())
        base = self.next_id()
        out_headers, out_body = _json({"data": [{"id": f"bench-{base:08d}-{i:04d}"} for i in range(len(items))]})
        if key:
            with self.lock:
                self.keys[key] = (200, out_headers, out_body)
        return 200, out_headers, out_body, addresses

    def ses(self, path, headers, body):
        if not headers.get("authorization", "").startswith(f"AWS4-HMAC-SHA256 Credential={AWS_KEY_ID}/") \
                or not headers.get("x-amz-date"):
            raise Refused(403, {"message": "The security token included in the request is invalid."},
                          [("Content-Type", "application/json"),
                           ("x-amzn-ErrorType", "UnrecognizedClientException:")])
        data = json.loads(body)
        to = data["Destination"]["ToAddresses"]
        if not isinstance(to, list) or not 1 <= len(to) <= SES_MAX_RECIPIENTS:
            raise Refused(400, {"message": f"Recipient count exceeds {SES_MAX_RECIPIENTS}."},
                          [("Content-Type", "application/json"), ("x-amzn-ErrorType", "BadRequestException:")])
        raw = base64.b64decode(data["Content"]["Raw"]["Data"], validate=True)
        if not data["FromEmailAddress"] or b"\r\n\r\n" not in raw:
            raise Refused(400, {"message": "Invalid raw message"},
                          [("Content-Type", "application/json"), ("x-amzn-ErrorType", "BadRequestException:")])
        return 200, *_json({"MessageId": f"bench-{self.next_id():012d}"}), to

    # -- control, for the bench ------------------------------------------------------------------

    def control(self, method: str, target: str, body: bytes):
        parts = urlsplit(target)
        if parts.path == "/_bench/reset" and method == "POST":
            self.reset(int(dict(parse_qsl(parts.query)).get("n", "0")))
            return 200, *_json({"ok": True}), False
        if parts.path == "/_bench/report":
            return 200, *_json(self.report()), False
        return 404, *_json({"message": "no such control"}), False

    def report(self) -> dict:
        with self.lock:
            ones, zeros = self.counts.count(1), self.counts.count(0)
            return {"n": self.n, "requests": len(self.requests), "messages": sum(m for _, m in self.requests),
                    "missing": zeros, "duplicates": self.n - ones - zeros, "unknown": self.unknown,
                    "refused": self.refused, "replays": self.replays, "by_provider": self.by_provider,
                    "arrivals": sorted(self.requests), "last_answer": self.last_answer,
                    "bytes_in": self.bytes_in, "work": self.work,
                    "latency": self.latency / self.answered if self.answered else 0.0,
                    "upload": self.upload / self.answered if self.answered else 0.0}


def _route(path: str) -> str | None:
    if path == "/v3/mail/send":
        return "sendgrid"
    if re.fullmatch(r"/v3/[^/]+/messages", path):
        return "mailgun"
    if path == "/email/batch":
        return "postmark"
    if path == "/emails/batch":
        return "resend"
    if path == "/v2/email/outbound-emails":
        return "ses"
    return None


REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 411: "Length Required", 422: "Unprocessable Entity",
           431: "Request Header Fields Too Large"}


def _response(status: int, headers: list[tuple[str, str]], body: bytes, close: bool) -> bytes:
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in headers)]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
        headers["connection"] = "close"
    return method, target, headers


def serve_asyncio(stand_in: StandIn, sock: socket.socket) -> None:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    writer.write(_response(431, [], b"", True))
                    return
                arrived = time.monotonic()
                try:
                    method, target, headers = _parse_head(head)
                    if "chunked" in headers.get("transfer-encoding", "").lower():
                        writer.write(_response(411, [], b"Content-Length bodies only", True))
                        return
                    length = int(headers.get("content-length") or 0)
                except ValueError:
                    writer.write(_response(400, [], b"bad request head", True))
                    return
                body = await reader.readexactly(length) if length else b""
                received = time.monotonic()
                status, out_headers, out_body, counted = stand_in.handle(method, target, headers, body, arrived)
                if counted and (wait := received + DELAY - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                close = headers.get("connection", "").lower() == "close"
                writer.write(_response(status, out_headers, out_body, close))
                await writer.drain()
                if counted:
                    stand_in.answered_one(arrived, received)
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(client, sock=sock, limit=64 * 1024 * 1024, backlog=128)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def serve_threads(stand_in: StandIn, sock: socket.socket) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # as asyncio does; else a delayed ACK can hold an answer 40 ms

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            arrived = time.monotonic()
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self.send_error(411)
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            received = time.monotonic()
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, out_headers, out_body, counted = stand_in.handle(self.command, self.path, headers, body, arrived)
            if counted and (wait := received + DELAY - time.monotonic()) > 0:
                time.sleep(wait)
            self.wfile.write(_response(status, out_headers, out_body, self.close_connection))  # one write
            if counted:
                stand_in.answered_one(arrived, received)

        do_GET = do_POST

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

        def server_bind(self) -> None:  # the socket is already bound and listening
            self.server_address = self.socket.getsockname()

        def server_activate(self) -> None:
            pass

    server = Server(sock.getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_bind()
    server.serve_forever(poll_interval=0.5)


def stand_in_main(kind: str) -> int:
    """The stand-in's process: listen on a free loopback port, say which on stdout, serve until
    stdin closes (the bench ended, or died) or STAND_IN_LIFETIME passes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"port {sock.getsockname()[1]}", flush=True)

    def watch_stdin() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True).start()
    threading.Timer(STAND_IN_LIFETIME, lambda: os._exit(3)).start()
    (serve_threads if kind == "threads" else serve_asyncio)(StandIn(), sock)
    return 0


# == the bench's side ===========================================================================

class StandInProcess:
    def __init__(self, kind: str, folder: Path):
        self.kind = kind
        self.command = [sys.executable, str(Path(__file__).resolve()), "--stand-in", "--server", kind]
        self.log = open(folder / "stand-in.err", "wb")
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("port "):
            self.stop()
            fail(f"the stand-in did not start: {line!r} {(folder / 'stand-in.err').read_text(errors='replace')}")
        self.port = int(line.split()[1])
        self.base_url = f"http://127.0.0.1:{self.port}"

    def call(self, method: str, path: str) -> dict:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=b"" if method == "POST" else None)
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                fail(f"the stand-in answered {response.status} to {method} {path}: {data[:200]!r}")
            return json.loads(data)
        finally:
            conn.close()

    def reset(self, n: int) -> None:
        self.call("POST", f"/_bench/reset?n={n}")

    def report(self) -> dict:
        return self.call("GET", "/_bench/report")

    def cpu_seconds(self) -> float | None:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        try:
            self.proc.stdin.close()  # it exits when its stdin closes
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def check_limits(stand_in: StandInProcess) -> list[str]:
    """One request just over each provider's limit, with a good key: each must be refused with
    the provider's status, and nothing counted."""
    import http.client

    addr = [f"reader{i:07d}@example.com" for i in range(1001)]
    bearer = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    sender = "brief@watchman.example"
    cases = [  # provider, path, headers, body, expected status, words the refusal must contain
        ("sendgrid", "/v3/mail/send", bearer, json.dumps({
            "from": {"email": sender}, "subject": "x", "content": [{"type": "text/plain", "value": "x"}],
            "personalizations": [{"to": [{"email": a}]} for a in addr[:1001]]}).encode(), 400, b"most 1000"),
        ("mailgun", f"/v3/{MAILGUN_DOMAIN}/messages",
         {"Authorization": "Basic " + base64.b64encode(f"api:{API_KEY}".encode()).decode(),
          "Content-Type": "application/x-www-form-urlencoded"},
         urlencode([("from", sender), ("subject", "x"), ("text", "x"), *(("to", a) for a in addr[:1001]),
                    ("recipient-variables", json.dumps({a: {} for a in addr[:1001]}))]).encode(),
         400, b"Too many recipients"),
        ("postmark", "/email/batch", {"X-Postmark-Server-Token": API_KEY, "Content-Type": "application/json"},
         json.dumps([{"From": sender, "To": a, "Subject": "x", "TextBody": "x"} for a in addr[:501]]).encode(),
         422, b'"ErrorCode": 410'),
        ("resend", "/emails/batch", bearer,
         json.dumps([{"from": sender, "to": [a], "subject": "x", "text": "x"} for a in addr[:101]]).encode(),
         422, b"Too many emails"),
        ("ses", "/v2/email/outbound-emails",
         {"Authorization": f"AWS4-HMAC-SHA256 Credential={AWS_KEY_ID}/20260101/us-east-1/ses/aws4_request, "
                           "SignedHeaders=host;x-amz-date, Signature=0", "X-Amz-Date": "20260101T000000Z",
          "Content-Type": "application/json"},
         json.dumps({"FromEmailAddress": sender, "Destination": {"ToAddresses": addr[:51]},
                     "Content": {"Raw": {"Data": base64.b64encode(b"To: x\r\n\r\nx").decode()}}}).encode(),
         400, b"exceeds 50"),
    ]
    stand_in.reset(len(addr))
    seen = []
    conn = http.client.HTTPConnection("127.0.0.1", stand_in.port, timeout=30)
    try:
        for provider, path, headers, body, expected, words in cases:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            text = response.read()
            if response.status != expected or words not in text:
                fail(f"stand-in self-check: {provider} over its limit answered {response.status}, not {expected}:"
                     f" {text[:300]!r}")
            seen.append(f"{provider} {response.status}")
    finally:
        conn.close()
    report = stand_in.report()
    if report["requests"] or report["messages"] or report["missing"] != len(addr):
        fail(f"stand-in self-check: refused requests were counted: {report['requests']} requests,"
             f" {report['messages']} messages")
    return seen


def write_config(folder: Path, store: Path) -> Path:
    """The repo's newsletter.toml, with [design] templates pointing at the repo's templates
    and [store] path at ``store``."""
    wanted = {"design": ("templates", str(ROOT / "templates")), "store": ("path", str(store))}
    section, out, done = None, [], set()

    def close_section():
        if section in wanted and section not in done:
            key, value = wanted[section]
            out.append(f"{key} = {json.dumps(value)}")
            done.add(section)

    for line in (ROOT / CONFIG).read_text(encoding="utf-8").splitlines():
        if m := re.match(r"\s*\[([A-Za-z_]+)\]", line):
            close_section()
            section = m.group(1)
        elif (m := re.match(r"\s*([A-Za-z_]+)\s*=", line)) and section in wanted and m.group(1) == wanted[section][0]:
            out.append(f"{m.group(1)} = {json.dumps(wanted[section][1])}")
            done.add(section)
            continue
        out.append(line)
    close_section()
    for section in wanted.keys() - done:
        key, value = wanted[section]
        out.append(f"\n[{section}]\n{key} = {json.dumps(value)}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "newsletter.toml"
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def make_store(path: Path, count: int) -> None:
    """``count`` subscribed addresses, reader0000000@example.com on, with executemany in one
    transaction, after Store() made the schema."""
    from newsletter.store import Store, now_iso

    path.parent.mkdir(parents=True, exist_ok=True)
    Store(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    stamp = now_iso()
    db.execute("BEGIN")
    db.executemany("INSERT INTO subscribers (email, name, fields, changed_at, changed_how) VALUES (?, ?, NULL, ?, ?)",
                   ((f"reader{i:07d}@example.com", f"Reader {i}", stamp, "bench") for i in range(count)))
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


# Linux keeps a process's peak RSS across exec, and a child that subprocess starts (vfork, then
# exec) begins with its parent's peak: wait4 on it would report at least this bench's own peak
# (hundreds of MB after the in-process builds). So each child is started by this small launcher,
# a fresh process, which forks, execs the command, times it and reports its wait4 figures.
LAUNCHER = """
import json, os, sys, time
report, command = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(command[0], command)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(report, "w") as out:
    json.dump({"code": os.waitstatus_to_exitcode(status), "wall": wall, "maxrss_kb": usage.ru_maxrss,
               "cpu": usage.ru_utime + usage.ru_stime}, out)
"""


def run_child(command: list[str], env: dict[str, str], folder: Path, what: str) -> tuple[float, float, int, str]:
    """Run ``command`` in the repo root; (wall seconds, CPU seconds, peak RSS in KB, output),
    of that child alone, from wait4 in LAUNCHER. Exits on failure."""
    stem = folder / f"{what.replace(' ', '-')}.{time.monotonic_ns()}"
    out_path, report_path = stem.with_suffix(".out"), stem.with_suffix(".json")
    with open(out_path, "wb") as out:
        done = subprocess.run([sys.executable, "-c", LAUNCHER, str(report_path), *command], cwd=ROOT, env=env,
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    output = out_path.read_text(encoding="utf-8", errors="replace")
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        report = {"code": f"launcher exit {done.returncode}"}
    if report["code"] != 0:
        sys.stderr.write(output[-4000:])
        fail(f"{what} failed (exit {report['code']}): {shlex.join(command)}")
    return report["wall"], report["cpu"], report["maxrss_kb"], output


@dataclass
class Run:
    backend: str
    n: int
    batch: int
    in_flight: int
    rate: float  # requests a second, 0 = no limit
    rate_check: bool = False
    # results
    wall: float = 0.0
    cpu: float = 0.0
    rss_mb: float = 0.0
    stand_in_cpu: float | None = None
    report: dict = field(default_factory=dict)
    msg_rate: float = 0.0
    req_rate: float = 0.0
    start_rate: float = 0.0
    min_gap: float = 0.0
    most_in_window: int = 0

    @property
    def label(self) -> str:
        rate = f"{self.rate:g} req/s" if self.rate else "no rate limit"
        return f"{self.backend}: {self.n:,}, {self.batch:,} a request, {self.in_flight} in flight, {rate}"

    @property
    def ceiling(self) -> float:
        by_flight = self.in_flight * self.batch / DELAY
        return min(by_flight, self.rate * self.batch) if self.rate else by_flight

    def env(self, base: dict[str, str], base_url: str) -> dict[str, str]:
        p = f"NEWSLETTER_{self.backend.upper()}_"
        env = dict(base)
        env.update({p + "BASE_URL": base_url, p + "BATCH_SIZE": str(self.batch),
                    p + "REQUESTS_IN_FLIGHT": str(self.in_flight), p + "REQUESTS_PER_SECOND": f"{self.rate:g}",
                    p + "TIMEOUT": "120"})
        if self.backend == "ses":
            env.update({"AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET})
        else:
            env[p + "API_KEY"] = API_KEY
        if self.backend == "mailgun":
            env["NEWSLETTER_MAILGUN_DOMAIN"] = MAILGUN_DOMAIN
        return env


def rates(report: dict) -> tuple[float, float, float, float, int]:
    """(messages/s and requests/s over the sending phase, from the first request's arrival at
    the stand-in to its last answer; requests started per second, (requests - 1) over the span
    of their arrivals; the smallest gap between two arrivals; the most arrivals in any window
    of WINDOW seconds, which is what a provider's per-second limit counts)."""
    arrivals = [a for a, _ in report["arrivals"]]
    phase = max(report["last_answer"] - arrivals[0], 1e-9)
    starts = (len(arrivals) - 1) / max(arrivals[-1] - arrivals[0], 1e-9) if len(arrivals) > 1 else 0.0
    gap = min((b - a for a, b in zip(arrivals, arrivals[1:])), default=0.0)
    most = max(bisect.bisect_left(arrivals, a + WINDOW) - i for i, a in enumerate(arrivals))
    return report["messages"] / phase, len(arrivals) / phase, starts, gap, most


def build_rate(backend_name: str, config_path: Path, env: dict[str, str], n: int, batch: int) -> tuple[float, float]:
    """The client's own rate in-process, no network and no ledger, on up to BUILD_SAMPLE of the
    same messages, the best of BUILD_PASSES passes: (messages/s for factory.build + provider
    build + build_request (+ SES signing), the share of it that is build_request + signing)."""
    from newsletter.backends import get_backend
    from newsletter.config import load_config
    from newsletter.message import MessageFactory
    from newsletter.reader import read_issue
    from newsletter.render import Renderer
    from newsletter.sender import make_signer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    os.environ.update({"AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET})
    os.environ.pop("AWS_SESSION_TOKEN", None)
    try:
        config = load_config(config_path, environ=env)
        rendered = Renderer(config).render(read_issue(ROOT / ISSUE))
        signer = make_signer(config, allow_ephemeral=False, warnings=[])
        factory = MessageFactory(rendered, config, signer)
        backend = get_backend(backend_name, config, Path(ISSUE).stem)
        asyncio.run(backend.open_worker())  # makes the client (and SES's signer); opens no connection
        count = max(batch, min(n, BUILD_SAMPLE) // batch * batch)
        people = [(f"reader{i:07d}@example.com", f"Reader {i}") for i in range(count)]
        people = [(e, name, signer.recipient_key(e)) for e, name in people]  # the ledger has rkey ready

        def one(start: int) -> float:
            messages = [factory.build(e, name, k) for e, name, k in people[start:start + batch]]
            spec = backend.build(messages)
            t = time.perf_counter()
            request = backend.client.build_request(spec.method, spec.path, json=spec.json, data=spec.data,
                                                   content=spec.content, headers=spec.headers)
            backend.sign(request)
            if spec.content is not None and not isinstance(spec.content, bytes):
                bytes(spec.content)  # a body streamed as it is sent (Postmark, Resend): its encoding counts
            return time.perf_counter() - t

        one(0)  # warm-up
        passes = []
        for _ in range(BUILD_PASSES):
            start = time.perf_counter()
            encoding = sum(one(i) for i in range(0, count, batch))
            elapsed = time.perf_counter() - start
            passes.append((count / elapsed, encoding / elapsed))
        asyncio.run(backend.close())
        return max(passes)  # the least disturbed pass, as timeit advises
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def profile_table(path: Path, n: int, backend: str, cpu_unprofiled: float, top: int = 15) -> str:
    """Where a profiled send's time goes, in µs a message: some frames we name (time inside them,
    callees included; a coroutine's time while suspended is not counted), then the top
    functions by their own time."""
    stats = pstats.Stats(str(path))
    total = stats.total_tt
    named = [
        ("render the issue (once)", "newsletter/render.py", "render"),
        ("queue the ledger rows (once)", "newsletter/store.py", "enqueue_subscribers"),
        ("ledger: Store.due", "newsletter/store.py", "due"),
        ("MessageFactory.build", "newsletter/message.py", "build"),
        (f"{backend} Backend.build", f"newsletter/backends/{backend}.py", "build"),
        ("httpx build_request (encodes the body)", "httpx/_client.py", "build_request"),
        ("SES SigV4 signing (botocore)", "newsletter/backends/ses.py", "sign"),
        ("httpx AsyncClient.send (the HTTP exchange)", "httpx/_client.py", "send"),
        ("  in it: httpcore current_async_library", "httpcore/_synchronization.py", "current_async_library"),
        (f"{backend} Backend.results", f"newsletter/backends/{backend}.py", "results"),
        ("ledger: Store.mark", "newsletter/store.py", "mark"),
        ("ledger: COMMIT (_Transaction.__exit__)", "newsletter/store.py", "__exit__"),
    ]
    out = [f"  total {total:.2f} s = {total / n * 1e6:,.0f} µs a message under cProfile"
           f" ({cpu_unprofiled / n * 1e6:,.0f} µs of CPU a message without it)",
           f"  {'µs/msg':>10} {'calls/msg':>9}  named frames, callees included"]
    for label, suffix, name in named:
        found = [(ct, nc) for (filename, _, func), (_, nc, _, ct, _) in stats.stats.items()
                 if func == name and filename.endswith(suffix)]
        if found:
            ct, nc = max(found)  # the outer one where names repeat (a method and its helper)
            out.append(f"  {ct / n * 1e6:10.1f} {nc / n:9.2f}  {label}")
    rows = []
    for (filename, line, name), (cc, nc, tt, ct, _callers) in stats.stats.items():
        where = name if filename == "~" else f"{_short(filename)}:{line}({name})"
        rows.append((tt, ct, nc, where))
    out.append(f"  {'own µs/msg':>10} {'cum µs/msg':>10} {'calls/msg':>9}  top {top} functions by own time")
    for tt, ct, nc, where in sorted(rows, reverse=True)[:top]:
        out.append(f"  {tt / n * 1e6:10.1f} {ct / n * 1e6:10.1f} {nc / n:9.2f}  {where}")
    return "\n".join(out)


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("site-packages", "newsletter", "python3.11", "lib"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i + (anchor != "newsletter"):])
    return filename


def version_of(package: str) -> str:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:
        return "?"


# -- main -----------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="10,000 messages a backend (SES and the Resend rate check 1,000)")
    parser.add_argument("--backends", default=",".join(PROVIDERS), metavar="A,B",
                        help=f"which backends (default all: {','.join(PROVIDERS)})")
    parser.add_argument("--messages", type=int, metavar="N",
                        help="messages a throughput run (default 100,000; --quick 10,000)")
    parser.add_argument("--in-flight", type=int, default=8, metavar="K", help="requests in flight (default 8)")
    parser.add_argument("--server", choices=("asyncio", "threads"), default="asyncio",
                        help="the stand-in: asyncio streams (default) or http.server's ThreadingHTTPServer")
    parser.add_argument("--profile", action="store_true",
                        help="also run each throughput send under `python -m cProfile` and print where the time goes")
    parser.add_argument("--stand-in", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stand_in:
        return stand_in_main(args.server)

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := [b for b in backends if b not in PROVIDERS]:
        fail(f"--backends: unknown {', '.join(unknown)}; expected some of {','.join(PROVIDERS)}")
    if not 1 <= args.in_flight <= 64:
        fail("--in-flight must be from 1 to 64 (requests_in_flight allows no more)")
    n = args.messages or (10_000 if args.quick else 100_000)
    n_small = min(n, 1_000 if args.quick else 2_000)  # SES, and Resend at 2 requests a second
    try:
        import httpx  # noqa: F401
        import newsletter  # noqa: F401
        from newsletter.sender import send_issue  # noqa: F401
        if "ses" in backends:
            import botocore  # noqa: F401
    except ImportError as exc:
        fail(f"cannot import the project ({exc}); run this with the project's venv python, e.g. "
             f".venv/bin/python bench/api.py (SES needs botocore: pip install -e '.[ses]')", code=2)

    runs: list[Run] = []
    for b in backends:
        if b == "ses":
            runs.append(Run(b, n_small, BATCH[b], args.in_flight, 0.0))
            # and at SES's default sending rate (the account's MaxSendRate), 10 seconds of it
            runs.append(Run(b, 70 if args.quick else 140, BATCH[b], args.in_flight, SES_DEFAULT_RATE, rate_check=True))
        else:
            runs.append(Run(b, n, BATCH[b], args.in_flight, 0.0))
            if b == "resend":
                runs.append(Run(b, n_small, BATCH[b], args.in_flight, 2.0, rate_check=True))

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    issue = Path(ISSUE).stem
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("NEWSLETTER_", "AWS_"))}
    base_env["NEWSLETTER_SECRET"] = SECRET
    builds: dict[str, tuple[float, float]] = {}
    profiles: list[tuple[Run, str]] = []

    with tempfile.TemporaryDirectory(prefix="newsletter-bench-api-") as tmp:
        tmp_path = Path(tmp)
        stand_in = StandInProcess(args.server, tmp_path)
        try:
            note(f"stand-in ({args.server}) on {stand_in.base_url}, pid {stand_in.proc.pid}; self-check ...")
            limit_checks = check_limits(stand_in)
            templates: dict[int, Path] = {}
            for count in sorted({r.n for r in runs}):
                note(f"building a store of {count:,} subscribers ...")
                templates[count] = tmp_path / f"template-{count}" / "newsletter.sqlite3"
                make_store(templates[count], count)

            for i, run in enumerate(runs):
                run_dir = tmp_path / f"run{i}-{run.backend}"
                store = fresh_copy(templates[run.n], run_dir)
                config_path = write_config(run_dir, store)
                env = run.env(base_env, stand_in.base_url)
                command = [sys.executable, "-m", "newsletter", "send", ISSUE, "--config", str(config_path),
                           "--backend", run.backend]
                note(f"[{i + 1}/{len(runs)}] {run.label} ...")
                stand_in.reset(run.n)
                c0 = stand_in.cpu_seconds()
                run.wall, run.cpu, rss_kb, output = run_child(command, env, tmp_path, f"send {run.backend}")
                c1 = stand_in.cpu_seconds()
                run.rss_mb = rss_kb / 1024
                run.stand_in_cpu = (c1 - c0) if c0 is not None and c1 is not None else None
                report = run.report = stand_in.report()
                counts = ledger_counts(store, issue)
                if counts.get("sent", 0) != run.n or sum(counts.values()) != run.n:
                    fail(f"{run.label}: the ledger should hold {run.n} sent rows, it holds {counts}")
                if f"sent {run.n}," not in output:
                    fail(f"{run.label}: unexpected output:\n{output[-2000:]}")
                problems = {k: report[k] for k in ("missing", "duplicates", "unknown") if report[k]}
                if problems or report["messages"] != run.n or report["refused"] or report["replays"]:
                    fail(f"{run.label}: the stand-in counted {report['messages']} messages for {run.n} addresses"
                         f" ({problems or 'each once'}), refused {report['refused']}, replays {report['replays']}")
                if report["requests"] != math.ceil(run.n / run.batch) or report["by_provider"] != {
                        run.backend: report["requests"]}:
                    fail(f"{run.label}: expected {math.ceil(run.n / run.batch)} requests to {run.backend},"
                         f" the stand-in saw {report['by_provider']}")
                run.msg_rate, run.req_rate, run.start_rate, run.min_gap, run.most_in_window = rates(report)

                if run.backend not in builds:
                    note(f"  {run.backend}: the client's own build rate, in-process ...")
                    builds[run.backend] = build_rate(run.backend, config_path, env, run.n, run.batch)

                if args.profile and not run.rate:
                    prof_dir = tmp_path / f"profile{i}-{run.backend}"
                    store = fresh_copy(templates[run.n], prof_dir)
                    prof = prof_dir / "send.prof"
                    command = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "newsletter", "send", ISSUE,
                               "--config", str(write_config(prof_dir, store)), "--backend", run.backend]
                    note(f"  {run.backend}: the same send under cProfile ...")
                    stand_in.reset(run.n)
                    elapsed, _, _, _ = run_child(command, env, tmp_path, f"profile {run.backend}")
                    if stand_in.report()["messages"] != run.n:
                        fail(f"{run.label}: the profiled send did not deliver {run.n} messages")
                    profiles.append((run, f"{run.label} (wall {elapsed:.1f} s under cProfile):\n"
                                          + profile_table(prof, run.n, run.backend, run.cpu)))
        finally:
            stand_in.stop()

    # Report.
    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    rows = []
    missed = []
    shown_build = set()
    for run in runs:
        build, encode_share = builds[run.backend]
        ratio = run.msg_rate / run.ceiling
        # The goal is the provider's published rate limit where one binds (Resend's 2
        # requests/s, SES's account rate); with none, the figure is what one process does.
        reachable = bool(run.rate) and run.ceiling <= build
        if reachable:
            ok = ratio >= RATIO_GOAL
            status = verdict(ok)
            if not ok:
                which = f"{run.backend} at {run.rate:g} req/s" if run.rate else run.backend
                missed.append(f"{which} reached {ratio:.2f}x its ceiling")
        elif run.stand_in_cpu is not None and run.stand_in_cpu > run.cpu and run.stand_in_cpu / run.wall >= 0.8:
            status = "own rate, stand-in-bound"  # the stand-in's parsing of the bodies took a core
        else:
            status = "own rate, client-bound"
        rows.append((run.label, f"{run.msg_rate:,.0f}", f"{run.req_rate:,.1f}", f"{run.ceiling:,.0f}",
                     f"{ratio:.3f} x" if ratio < 0.1 else f"{ratio:.2f} x", f">= {RATIO_GOAL:g} x" if reachable else "",
                     status, f"{run.rss_mb:,.0f} MB", f"{run.wall:.1f} s"))
        if run.backend not in shown_build:
            shown_build.add(run.backend)
            encoding = "request encoding" + " + signing" * (run.backend == "ses")
            rows.append((f"  client build in-process ({encode_share:.0%} of it {encoding})", f"{build:,.0f}",
                         "", "", f"{run.msg_rate / build:.2f} x", "", "of build", "", ""))
        if run.rate_check:
            allowed = math.floor(run.rate * 1.0 + 1e-9)
            limit_ok = run.most_in_window <= allowed
            if not limit_ok:
                missed.append(f"{run.backend} at {run.rate:g} req/s: {run.most_in_window} requests arrived"
                              " within one second")
            rows.append((f"  rate limit: most requests arriving in any 1 s (mean {run.start_rate:.2f}/s,"
                         f" smallest gap {run.min_gap * 1000:.0f} ms)",
                         "", f"{run.most_in_window}", "", "", f"<= {allowed}", verdict(limit_ok), "", ""))
    headers = ("run", "msg/s", "req/s", "ceiling msg/s", "ratio", "goal", "status", "peak RSS", "wall")
    widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(len(headers))]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    side_rows = []
    for run in runs:
        r = run.report
        side_rows.append((run.label.split(":")[0] + (f" ({run.rate:g} req/s)" if run.rate_check else ""),
                          f"{run.cpu / run.wall:.0%}", f"{run.cpu / run.n * 1e6:,.0f} µs",
                          f"{run.stand_in_cpu / run.wall:.0%}" if run.stand_in_cpu is not None else "?",
                          f"{r['work'] / max(r['requests'], 1) * 1000:.2f} ms",
                          f"{r['upload'] * 1000:.1f} ms", f"{r['latency'] * 1000:.1f} ms", f"{r['requests']:,}",
                          f"{r['bytes_in'] / max(r['requests'], 1) / 1e6:.2f} MB",
                          f"{r['bytes_in'] / max(r['messages'], 1) / 1024:.1f} KB"))
    side_headers = ("run", "CPU ours", "ours CPU/msg", "CPU stand-in", "stand-in work/req", "body upload",
                    "answer after", "requests", "body/req", "body/msg")
    side_widths = [max(len(r[i]) for r in (side_headers, *side_rows)) for i in range(len(side_headers))]

    def side_line(cells) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, side_widths))).rstrip()

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = (" --quick" * args.quick + (f" --backends {','.join(backends)}" if backends != list(PROVIDERS) else "")
             + (f" --messages {n}" if args.messages else "")
             + (f" --in-flight {args.in_flight}" if args.in_flight != 8 else "")
             + (f" --server {args.server}" if args.server != "asyncio" else "") + " --profile" * args.profile)
    rerun = f"cd {shlex.quote(str(ROOT))} && {shlex.quote(sys.executable)} bench/api.py{flags}"

    print(f"newsletter send benchmark, HTTP email APIs: {ISSUE} through each backend to a loopback stand-in"
          f" on 127.0.0.1 ({args.server}, its own process) that answers like the provider {DELAY * 1000:g} ms after"
          f" each request and enforces its batch limit")
    print(f"machine: {platform.system()} {platform.machine()}, {cpu_model()}, nproc {affinity}"
          f" (cpu_count {os.cpu_count()}), Python {platform.python_version()}, httpx {version_of('httpx')},"
          f" botocore {version_of('botocore')}, SQLite {sqlite3.sqlite_version}"
          + (f", load average {load_before[0]:.2f} at start" if load_before else ""))
    print(f"msg/s and req/s: over the sending phase, from the first request's arrival at the stand-in to its last"
          f" answer (a run of R requests at a rate limit takes (R - 1)/rate + {DELAY * 1000:g} ms, so it shows up to"
          f" R/(R - 1) of the limit; the rate check counts arrivals in any {WINDOW * 1000:.0f} ms, 1 s less 20 ms of"
          f" timer jitter); ceiling = min(in flight x batch / {DELAY * 1000:g} ms, rate x batch);"
          f" client-bound where the ceiling is above the client's own in-process build rate (factory.build +"
          f" provider build + httpx build_request, + SigV4 for SES; best of {BUILD_PASSES} passes over up to"
          f" {BUILD_SAMPLE:,} messages, no network, no ledger); peak RSS of the `newsletter send` process (wait4);"
          f" wall = that whole process"
          f" (start-up, render, queueing the ledger, sending)")
    print()
    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    print()
    print("who was busy (CPU s per wall s of the `newsletter send` process; 100% = one core; body upload = the"
          " request's head to its last byte at the stand-in; answer after = its last byte to the answer written):")
    print(side_line(side_headers))
    print(side_line(["-" * w for w in side_widths]))
    for row in side_rows:
        print(side_line(row))
    print()
    print(f"checked: stand-in self-check refused one request over each limit ({', '.join(limit_checks)});"
          f" each run exited 0, its ledger holds every message as sent, and the stand-in counted each address"
          f" exactly once, with nothing refused")
    if "ses" in backends:
        print(f"ses: {n_small:,} messages, not {n:,}: one a request; requests_per_second raised from its default 14"
              " (the account's MaxSendRate) to 0, no limit, so the requests in flight are the limit")
    if args.quick:
        print(f"--quick: {n:,} messages a run (the full run uses 100,000; SES and the Resend rate check 2,000);"
              " quick figures are rough")
    ours_shown = [sys.executable, "-m", "newsletter", "send", ISSUE, "--config", "TMP/newsletter.toml",
                  "--backend", "X"]
    print(f"ours:     {shlex.join(ours_shown)}")
    print(f"          env NEWSLETTER_X_BASE_URL=http://127.0.0.1:PORT NEWSLETTER_X_API_KEY=..."
          f" NEWSLETTER_X_BATCH_SIZE=B"
          f" NEWSLETTER_X_REQUESTS_IN_FLIGHT={args.in_flight} NEWSLETTER_X_REQUESTS_PER_SECOND=R"
          f" NEWSLETTER_X_TIMEOUT=120"
          f" NEWSLETTER_SECRET=... (mailgun: NEWSLETTER_MAILGUN_DOMAIN={MAILGUN_DOMAIN}; ses: AWS_ACCESS_KEY_ID,"
          f" AWS_SECRET_ACCESS_KEY instead of the key)")
    print(f"stand-in: {shlex.join([sys.executable, 'bench/api.py', '--stand-in', '--server', args.server])}")
    print(f"rerun: {rerun}")
    if missed:
        print("goal missed: " + "; ".join(missed))
    for _run, text in profiles:
        print()
        print("cProfile of " + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
