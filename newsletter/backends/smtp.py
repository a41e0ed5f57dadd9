"""SMTP: a small asyncio client that keeps connections open and pipelines (RFC 2920).

Per message, with PIPELINING: MAIL, RCPT and DATA go in one write, then the content; two
round trips instead of four. Several connections run side by side, each reused for
``messages_per_connection`` messages. The final "." waits for the ledger to say the
message is `sending` (the send's `ready` future): with a database server's ledger the
commit travels while the envelope and the content do.

Security: ``starttls`` (default) refuses to go on if the server does not offer STARTTLS;
certificates are verified unless ``verify_tls = false``; the password comes only from
NEWSLETTER_SMTP_PASSWORD and is never sent over an unencrypted connection.

Replies are judged by outcome.smtp_outcome, by the command they answer. 421 or a dropped
connection before the content went out: the message is tried once more on a new
connection. A drop after the content went out but before the reply: uncertain, since the
server may have taken it; it is never resent by itself.

Opening a connection fails in two ways. The server cannot be reached (connection refused,
a timeout, a 421 or other 4xx at the greeting, EHLO or AUTH, a drop): ServerUnreachable.
Then only that connection's message is deferred; the connection waits (backoff: 0.5 s,
doubling to 30 s) before it takes more, while the others go on. The run stops (SendError,
the rest pending or deferred) only when no connection has got through for
``smtp.give_up_after`` seconds: any message sent or connection opened resets the clock.
The very first connection of a run still fails fast, so a wrong host or port stops the
run at once with everyone pending. Everything else is about us and stops the run at once:
554 at the greeting, EHLO and HELO refused, no STARTTLS, an untrusted certificate,
tampering, a refused login, a reply that is not SMTP.

Hardening: bytes the server sends after its 220 to STARTTLS and before the handshake are
refused as tampering (CVE-2011-0411: asyncio's start_tls keeps them in the reader, where
they would be read as replies inside TLS); a reply line over 2,048 bytes, one that is not
"3 digits, then space or hyphen", a multiline reply whose codes differ, or bytes that are
not text, is a protocol error; EHLO refused with 5xx falls back to HELO (no extensions);
without smtp.helo_name, a machine that calls itself "localhost" greets only loopback.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Awaitable

from ..config import Smtp
from ..errors import SendError
from ..message import Message
from ..outcome import DATA, MAIL, RCPT, smtp_outcome, uncertain, unreachable
from .base import SENT, Backend, Outcome, Worker

LOOPBACK = ("localhost", "127.0.0.1", "::1")
MAX_LINE = 2048  # RFC 5321 4.5.3.1.5 allows 512 octets for a reply line; some servers say more
# "250", "250 text" or "250-text": reply codes are 2yz to 5yz (RFC 5321 4.2)
_REPLY_LINE = re.compile(r"([2-5][0-9][0-9])(?:([ -])(.*))?", re.S)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class ServerUnreachable(SendError):
    """The server could not be reached or would not talk now (refused, timed out, 421, a
    drop): the message is deferred and the connection retried later; see SmtpWorker."""


class ConnectionLost(Exception):
    """The server closed the connection (or said 421) before the message was accepted."""

    def __init__(self, reply: str, content_sent: bool = False):
        super().__init__(reply)
        self.reply = reply
        self.content_sent = content_sent


class ProtocolError(ConnectionLost):
    """The server's reply is not SMTP (garbled, over-long, not text): the connection is
    unusable. At the greeting it stops the run (a wrong port, or not a mail server)."""


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines).strip()

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


def tls_context(settings: Smtp) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class SmtpConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.reader, self.writer, self.timeout = reader, writer, timeout
        self.extensions: dict[str, str] = {}
        self.early: Message | None = None  # the message whose envelope went out behind the last "."

    # -- talking ---------------------------------------------------------------------------

    async def read_reply(self) -> Reply:
        try:
            async with asyncio.timeout(self.timeout):  # a timer, not a task as wait_for makes
                return await self._read_reply()
        except TimeoutError:
            raise ConnectionLost(f"no reply within {self.timeout:g} s") from None

    async def _read_reply(self) -> Reply:
        """One reply, without a timeout of its own: the caller sets one."""
        lines: list[str] = []
        code = None
        try:
            while True:
                try:
                    line = await self.reader.readline()
                except ValueError:  # asyncio's own limit (LimitOverrunError): a line with no end in sight
                    raise ProtocolError(f"protocol error: a reply line longer than {MAX_LINE} bytes") from None
                if not line:
                    raise ConnectionLost("connection closed by the server")
                if len(line) > MAX_LINE:
                    raise ProtocolError(f"protocol error: a reply line of {len(line)} bytes (at most {MAX_LINE})")
                if not line.endswith(b"\n"):
                    raise ConnectionLost("connection closed by the server in the middle of a reply")
                found = _REPLY_LINE.fullmatch(_text(line))
                if not found:
                    raise ProtocolError(f"protocol error: not an SMTP reply: {line[:80]!r}")
                if code is not None and found.group(1) != code:
                    raise ProtocolError(f"protocol error: a multiline reply whose codes differ ({code}, then "
                                        f"{found.group(1)})")
                code = found.group(1)
                lines.append(found.group(3) or "")
                if found.group(2) != "-":
                    break
        except (ConnectionError, OSError) as exc:
            raise ConnectionLost(f"connection lost: {exc}") from exc
        reply = Reply(int(code), tuple(lines))
        if reply.code == 421:
            raise ConnectionLost(str(reply))
        return reply

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        if not self.writer.transport.get_write_buffer_size():
            return  # all of it went out already: nothing to wait for
        try:
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        except TimeoutError:
            raise ConnectionLost(f"could not write within {self.timeout:g} s") from None
        except (ConnectionError, OSError) as exc:
            raise ConnectionLost(f"connection lost: {exc}") from exc

    async def command(self, line: str) -> Reply:
        self.write(line.encode("ascii") + b"\r\n")
        await self.drain()
        return await self.read_reply()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    async def open(cls, settings: Smtp) -> "SmtpConnection":
        where = f"smtp {settings.host}:{settings.port}"
        context = tls_context(settings) if settings.security in ("ssl", "starttls") else None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                settings.host, settings.port,
                ssl=context if settings.security == "ssl" else None,
                server_hostname=settings.host if settings.security == "ssl" else None,
                limit=4 * MAX_LINE,  # readline's buffer: a server cannot make us hold more
            ), settings.timeout)
        except ssl.SSLCertVerificationError as exc:
            raise SendError(f"{where}: the server's certificate is not trusted: {exc.verify_message}") from exc
        except ssl.SSLError as exc:
            raise SendError(f"{where}: TLS failed: {exc.reason or exc}") from exc
        except (OSError, asyncio.TimeoutError) as exc:
            why = "connection refused" if isinstance(exc, ConnectionRefusedError) else exc or "timed out"
            raise ServerUnreachable(f"{where}: cannot connect: {why}") from exc
        conn = cls(reader, writer, settings.timeout)
        try:
            await conn._greet(settings, context, where)
        except ProtocolError as exc:  # not a mail server speaking SMTP: a wrong port, or worse
            conn.abort()
            raise SendError(f"{where}: {exc.reply}") from exc
        except ConnectionLost as exc:
            conn.abort()
            raise ServerUnreachable(f"{where}: {exc.reply}") from exc
        except BaseException:
            conn.abort()
            raise
        return conn

    @property
    def peer(self) -> str | None:
        peer = self.writer.get_extra_info("peername")
        return peer[0] if peer else None

    async def _greet(self, settings: Smtp, context: ssl.SSLContext | None, where: str) -> None:
        try:
            greeting = await self.read_reply()
        except ConnectionLost as exc:  # it took the connection and said nothing (or hung up)
            raise type(exc)(f"no greeting from the server: {exc.reply}") from exc
        if 400 <= greeting.code < 500:
            raise ServerUnreachable(f"{where}: the server will not talk now: {greeting}")
        if greeting.code != 220:
            raise SendError(f"{where}: the server will not talk: {greeting}")
        helo = ehlo_name(settings.helo_name, self.peer, where)
        await self._hello(helo, where, fallback=True)
        if settings.security == "starttls":
            if "STARTTLS" not in self.extensions:
                why = f" (it refused EHLO: {self.ehlo_refused}, so it offers no extensions)" if self.ehlo_refused else ""
                raise SendError(f"{where}: the server does not offer STARTTLS{why}; refusing to send in the clear "
                                "(set smtp.security = \"none\" only for a trusted relay)")
            reply = await self.command("STARTTLS")
            if reply.code != 220:
                raise SendError(f"{where}: STARTTLS refused: {reply}")
            # Anything already read past the 220 was sent in the clear, and start_tls keeps
            # it in the reader, where it would pass for the first replies inside TLS.
            if getattr(self.reader, "_buffer", b""):
                raise SendError(f"{where}: the server sent data before the TLS handshake: possible tampering; "
                                "refusing")
            try:
                await asyncio.wait_for(self.writer.start_tls(context, server_hostname=settings.host),
                                       settings.timeout)
            except ssl.SSLCertVerificationError as exc:
                raise SendError(f"{where}: the server's certificate is not trusted: {exc.verify_message}") from exc
            except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
                raise SendError(f"{where}: TLS failed: {exc or 'timed out'}") from exc
            # And again: bytes that arrived in the clear while start_tls waited its turn in
            # the event loop are in the reader too (the server says nothing of its own
            # inside TLS before our EHLO).
            if getattr(self.reader, "_buffer", b""):
                raise SendError(f"{where}: the server sent data before the TLS handshake: possible tampering; "
                                "refusing")
            await self._hello(helo, where, fallback=False)
        if settings.username:
            await self._login(settings, where)

    ehlo_refused: str | None = None

    async def _hello(self, name: str, where: str, fallback: bool) -> None:
        reply = await self.command(f"EHLO {name}")
        self.extensions = {}
        if reply.code == 250:
            for line in reply.lines[1:]:
                keyword, _, params = line.partition(" ")
                self.extensions[keyword.upper()] = params
            return
        if 400 <= reply.code < 500:
            raise ServerUnreachable(f"{where}: EHLO deferred: {reply}")
        if fallback:  # an old or minimal server: HELO, and no extensions at all (RFC 5321 4.1.1.1)
            helo = await self.command(f"HELO {name}")
            if helo.code == 250:
                self.ehlo_refused = str(reply)
                return
            raise SendError(f"{where}: EHLO refused ({reply}), and HELO too ({helo})")
        raise SendError(f"{where}: EHLO refused: {reply}")

    async def _login(self, settings: Smtp, where: str) -> None:
        if not settings.password:
            raise SendError(f"{where}: smtp.username is set but NEWSLETTER_SMTP_PASSWORD is not")
        if settings.security == "none" and settings.host not in LOOPBACK:
            raise SendError(f"{where}: refusing to send the password over an unencrypted connection")
        methods = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in methods:
            secret = base64.b64encode(f"\0{settings.username}\0{settings.password}".encode()).decode()
            reply = await self.command(f"AUTH PLAIN {secret}")
        elif "LOGIN" in methods:
            reply = await self.command("AUTH LOGIN")
            if reply.code == 334:
                reply = await self.command(base64.b64encode(settings.username.encode()).decode())
            if reply.code == 334:
                reply = await self.command(base64.b64encode(settings.password.encode()).decode())
        else:
            raise SendError(f"{where}: the server offers no login method we know (AUTH {' '.join(methods) or 'none'})")
        if 400 <= reply.code < 500:  # 454 4.7.0 temporary authentication failure: the server's
            raise ServerUnreachable(f"{where}: login deferred: {reply}")
        if reply.code != 235:
            raise SendError(f"{where}: login refused: {reply}")

    # -- sending ---------------------------------------------------------------------------

    async def send(self, message: Message, ready: Awaitable | None = None, after: Message | None = None) -> Outcome:
        """`ready`: see Worker.send_batch. The content goes out meanwhile; only the final
        ".", which makes the server take the message, waits for it.

        `after`: the message this connection sends next. With PIPELINING its envelope
        goes out right behind this one's "." (RFC 2920 4 shows it), so that its replies
        come back with this one's: a round trip a message instead of two. An envelope
        delivers nothing without its content and "."."""
        if self.early is not None:
            if self.early is not message:  # a bug in the caller: this connection is mid-envelope
                raise ConnectionLost("the connection holds another message's envelope")
            self.early = None
            try:
                async with asyncio.timeout(self.timeout):
                    replies = [await self._read_reply() for _ in range(3)]
            except TimeoutError:
                raise ConnectionLost(f"no reply within {self.timeout:g} s") from None
        elif "PIPELINING" in self.extensions:
            self.write(_envelope(message))
            try:
                async with asyncio.timeout(self.timeout):  # one timer for the three replies
                    await self.drain()
                    replies = [await self._read_reply() for _ in range(3)]
            except TimeoutError:
                raise ConnectionLost(f"no reply within {self.timeout:g} s") from None
        else:
            replies = []
            for line in _envelope_lines(message):
                replies.append(await self.command(line))
                if replies[-1].code >= 400:
                    break
        refused = next((i for i, r in enumerate(replies) if r.code >= 400 and r.code != 354), None)
        if refused is not None:
            if replies[-1].code == 354:  # a server that said yes to DATA anyway: end it empty
                await self.command(".")
            await self.reset()
            return smtp_outcome(replies[refused].code, replies[refused].text, (MAIL, RCPT, DATA)[refused])
        # Dot-stuffing: a line that starts with "." gets another one. Our own messages have
        # none (see Message.needs_dot_stuffing), so they are not even scanned.
        data = message.data
        if message.needs_dot_stuffing and (data.startswith(b".") or b"\r\n." in data):
            data = (b"." if data.startswith(b".") else b"") + data.replace(b"\r\n.", b"\r\n..")
        end = b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n"
        if after is not None and "PIPELINING" in self.extensions:
            end += _envelope(after)
        else:
            after = None
        if ready is not None:
            if not ready.done():  # the content goes out while the commit travels
                self.write(data)
                data = b""
            try:
                await ready  # raises the ledger's failure, if it failed
            except BaseException:
                # No ".": the server drops the transaction, nothing is delivered. Anything
                # more (QUIT too) would be read as content: the connection goes.
                self.abort()
                raise
        self.write(data + end)  # with the content when it can: a write of its own costs a system call
        try:
            await self.drain()
            reply = await self.read_reply()
        except ConnectionLost as exc:
            raise ConnectionLost(exc.reply, content_sent=True) from exc
        self.early = after  # its replies are next
        return smtp_outcome(reply.code, reply.text, DATA)

    async def reset(self) -> None:
        await self.command("RSET")

    async def quit(self) -> None:
        if self.early is not None:  # the server may be waiting for content: QUIT would be taken for it
            self.abort()
            return
        try:
            await asyncio.wait_for(self.command("QUIT"), 2)
        except (ConnectionLost, asyncio.TimeoutError, OSError):
            pass
        self.abort()

    def abort(self) -> None:
        try:
            self.writer.close()
        except OSError:
            pass


def _envelope_lines(message: Message) -> tuple[str, str, str]:
    return f"MAIL FROM:<{message.sender}>", f"RCPT TO:<{message.recipient}>", "DATA"


def _envelope(message: Message) -> bytes:
    """The envelope in one write (PIPELINING)."""
    return "".join(f"{line}\r\n" for line in _envelope_lines(message)).encode("ascii")


def _text(line: bytes) -> str:
    """A reply line as text, or a protocol error for bytes that are not (NUL, binary, bad UTF-8)."""
    try:
        text = line.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"protocol error: a reply that is not text: {line[:80]!r}") from None
    if _CONTROL.search(text):
        raise ProtocolError(f"protocol error: a reply with control characters: {line[:80]!r}")
    return text


@functools.lru_cache(maxsize=1)
def this_machine() -> str:
    return socket.getfqdn()  # a DNS lookup: once a run, not once a connection


def is_loopback(address: str | None) -> bool:
    if not address:
        return False
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def ehlo_name(configured: str | None, peer: str | None, where: str = "smtp", machine: str | None = None) -> str:
    """The name we give in EHLO: smtp.helo_name, else this machine's own name. A machine
    that calls itself "localhost" (or a name with no dot) may say so only to a server on
    loopback: any other server refuses that EHLO or scores it as spam."""
    if configured:
        return configured
    name = this_machine() if machine is None else machine
    try:
        ip = ipaddress.ip_address(name)
        return f"[{name}]" if ip.version == 4 else f"[IPv6:{name}]"  # an address literal (RFC 5321 4.1.3)
    except ValueError:
        pass
    lower = name.lower().rstrip(".")
    if lower and "." in lower and not lower.startswith("localhost.") and lower != "localhost":
        return name
    if is_loopback(peer):
        return name or "localhost"
    raise SendError(f"{where}: this machine calls itself {name or 'nothing'!r}, and a server that is not on "
                    "loopback would refuse that in EHLO or score it as spam; set smtp.helo_name "
                    "(NEWSLETTER_SMTP_HELO_NAME) to this machine's public name, one whose address resolves "
                    "back to it")


class _Reachability:
    """Shared by a backend's connections: how long has no connection got through?"""

    def __init__(self, settings: Smtp):
        self.settings = settings
        self.failing_since: float | None = None
        self.failures = 0

    def ok(self) -> None:
        self.failing_since, self.failures = None, 0

    def failed(self, exc: ServerUnreachable) -> None:
        """Raises SendError, stopping the run, once nothing has got through for give_up_after."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        self.failures += 1
        waited = now - self.failing_since
        if self.failures >= 2 and waited >= self.settings.give_up_after:
            s = self.settings
            raise SendError(f"smtp {s.host}:{s.port}: no connection got through for {waited:.0f} s "
                            f"({self.failures} attempts in a row; smtp.give_up_after is {s.give_up_after:g} s); "
                            f"last: {exc}. Nobody has been marked failed: the rest is pending or deferred, "
                            "run send again once the server is back") from exc


class SmtpWorker(Worker):
    BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0  # seconds a connection that could not connect waits

    def __init__(self, settings: Smtp, reach: _Reachability | None = None):
        self.settings = settings
        self.reach = reach or _Reachability(settings)
        self.conn: SmtpConnection | None = None
        self.used = 0
        self.backoff = 0.0
        self.resume_at = 0.0

    def pause(self) -> float:
        return max(0.0, self.resume_at - time.monotonic())

    async def send_batch(self, messages: list[Message], ready: Awaitable | None = None,
                         after: Message | None = None) -> list[Outcome]:
        return [await self.send(message, ready, after if i == len(messages) - 1 else messages[i + 1])
                for i, message in enumerate(messages)]

    async def send(self, message: Message, ready: Awaitable | None = None, after: Message | None = None) -> Outcome:
        for attempt in (1, 2):
            if self.conn is not None and self.conn.early not in (None, message):
                await self.conn.quit()  # it holds the envelope of a message that is not coming
                self.conn = None
            if self.conn is None or self.used >= self.settings.messages_per_connection:
                try:
                    await self._reconnect()
                except ServerUnreachable as exc:
                    self.unreachable(exc)  # may stop the run: nothing got through for too long
                    return unreachable(str(exc))
            self.used += 1
            try:  # the next message's envelope rides with this one's "." if this connection will send it
                outcome = await self.conn.send(message, ready,
                                               after if self.used < self.settings.messages_per_connection else None)
            except ConnectionLost as exc:
                self.conn.abort()
                self.conn = None
                if exc.content_sent:  # it may have been delivered: never resent by itself
                    return uncertain(f"{exc.reply} (after the message was sent, before the reply)")
                if attempt == 2:
                    return unreachable(exc.reply)
                continue
            except BaseException:  # the ledger failed before the "." (the connection was dropped), or worse
                if self.conn.writer.is_closing():
                    self.conn = None
                raise
            self.reach.ok()
            return outcome
        raise AssertionError("unreachable")

    def unreachable(self, exc: ServerUnreachable) -> None:
        """This connection waits before it tries again; the others go on."""
        self.backoff = min(self.BACKOFF_MAX, self.backoff * 2 or self.BACKOFF_FIRST)
        self.resume_at = time.monotonic() + self.backoff
        self.reach.failed(exc)

    async def _reconnect(self) -> None:
        if self.conn is not None:
            await self.conn.quit()
            self.conn = None
        self.conn = await SmtpConnection.open(self.settings)
        self.used = 0
        self.backoff = 0.0
        self.reach.ok()

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.quit()
            self.conn = None


class SmtpBackend(Backend):
    name = "smtp"

    def __init__(self, settings: Smtp):
        self.settings = settings
        self.connections = settings.connections
        self.reach = _Reachability(settings)
        self.opened = 0

    async def open_worker(self) -> Worker:
        worker = SmtpWorker(self.settings, self.reach)
        try:
            await worker._reconnect()
        except ServerUnreachable as exc:
            if not self.opened:
                raise  # the first connection fails fast: a wrong host or port stops the run here
            worker.unreachable(exc)  # another one: it tries again after its backoff
        self.opened += 1
        return worker

    def warnings(self) -> list[str]:
        s = self.settings
        if s.security != "none" and not s.verify_tls:
            return [f"smtp.verify_tls is false: the certificate of {s.host} is not checked, so anyone on the "
                    "path can read and change these messages and the login; set smtp.ca_file instead"]
        return []

    def describe(self) -> str:
        s = self.settings
        return f"smtp {s.host}:{s.port} ({s.security}, {s.connections} connection{'s' * (s.connections != 1)})"


__all__ = ["SmtpBackend", "SmtpConnection", "SmtpWorker", "SENT", "ConnectionLost", "ProtocolError",
           "ServerUnreachable", "ehlo_name"]
