"""A real SMTP server on loopback for the send tests: aiosmtpd with STARTTLS and AUTH,
recording what it accepts, and misbehaving on cue for chosen recipients."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

USER, PASSWORD = "sender", "correct horse battery staple"


def make_certificate(folder: Path, host: str | None = None) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (made by openssl), or for
    `host` alone (a certificate for another host than the one connected to)."""
    name = host or "localhost"
    prefix = f"{host}." if host else ""
    cert, key = folder / f"{prefix}cert.pem", folder / f"{prefix}key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{host}" if host else "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Received:
    recipient: str
    data: bytes
    session: int
    mail_from: str = ""  # the envelope sender (VERP: the reader's own bounce address)


@dataclass
class Handler:
    pipelining: bool = True
    delay: float = 0.0  # seconds to wait before answering DATA, to make sends slow enough to kill
    # recipient -> replies to give to RCPT, one per attempt ("drop" closes the connection in DATA)
    script: dict[str, list[str]] = field(default_factory=dict)
    # a reply for every MAIL FROM, every RCPT TO, or every message's DATA, instead of 250
    refuse_mail: str | None = None
    refuse_rcpt: str | None = None
    refuse_data: str | None = None
    received: list[Received] = field(default_factory=list)
    attempts: Counter = field(default_factory=Counter)  # RCPT commands, by recipient
    rcpts: list = field(default_factory=list)  # (recipient, session id) of each RCPT
    contents: Counter = field(default_factory=Counter)  # messages whose content reached DATA's end, by recipient
    dropped: set = field(default_factory=set)  # the sessions a "drop" script closed
    sessions: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def delivered(self) -> Counter:
        with self.lock:
            return Counter(r.recipient for r in self.received)

    def _next(self, recipient: str) -> str | None:
        replies = self.script.get(recipient)
        return replies.pop(0) if replies else None

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self.sessions.add(id(session))
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.refuse_mail:
            return self.refuse_mail
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.attempts[address] += 1
        self.rcpts.append((address, id(session)))
        reply = self._next(address) or self.refuse_rcpt
        if reply == "drop":
            session.drop_in_data = True
        elif reply:
            if reply.startswith("421"):
                asyncio.get_running_loop().call_later(0.01, server.transport.close)
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.contents.update(envelope.rcpt_tos)
        if getattr(session, "drop_in_data", False):
            session.drop_in_data = False
            self.dropped.add(id(session))
            server.transport.close()  # gone before the reply: the client cannot know
            return "250 never seen"
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.refuse_data:
            return self.refuse_data
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.received.append(Received(rcpt, envelope.original_content, id(session), envelope.mail_from))
            n = len(self.received)
        return f"250 2.0.0 Ok: queued as {n}"


class _RefusingController(Controller):
    """A server that answers the greeting with a refusal and hangs up."""

    def __init__(self, *args, greeting: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.greeting = greeting

    def factory(self):
        greeting = self.greeting

        class Refusing(SMTP):
            async def _handle_client(self):
                await self.push(greeting)
                self.transport.close()

        return Refusing(self.handler, **self.SMTP_kwargs)


class Server:
    """Start with `with Server(handler, tls=(cert, key)) as server:`; server.port.
    `greeting="554 ..."` makes one that refuses every client at once."""

    def __init__(self, handler: Handler, tls: tuple[Path, Path] | None = None, auth: bool = True,
                 greeting: str | None = None, port: int | None = None,
                 credentials: tuple[str, str] = (USER, PASSWORD)):
        self.handler = handler
        self.port = port or free_port()
        kwargs = {}
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            kwargs.update(tls_context=context, require_starttls=True)
        if auth:
            kwargs.update(authenticator=_authenticator(*credentials), auth_required=True,
                          auth_require_tls=bool(tls))
        if greeting:
            kwargs["greeting"] = greeting
        self.controller = (_RefusingController if greeting else Controller)(
            handler, hostname="127.0.0.1", port=self.port, server_hostname="localhost",
            data_size_limit=10_000_000, **kwargs)

    def __enter__(self):
        self.controller.start()
        return self

    def __exit__(self, *exc):
        self.controller.stop()


def _authenticator(user: str, password: str):
    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data.login == user.encode() and \
            auth_data.password == password.encode()
        return AuthResult(success=ok, handled=False)  # handled=False: the server answers 535 itself
    return authenticate


__all__ = ["Handler", "Server", "make_certificate", "free_port", "USER", "PASSWORD", "defaultdict"]
