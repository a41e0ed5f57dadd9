"""SMTP: a small asyncio client that keeps connections open and pipelines (RFC 2920).

Per message, with PIPELINING: MAIL, RCPT and DATA go in one write, then the content; two
round trips instead of four. Several connections run side by side, each reused for
``messages_per_connection`` messages.

Security: ``starttls`` (default) refuses to go on if the server does not offer STARTTLS;
certificates are verified unless ``verify_tls = false``; the password comes only from
NEWSLETTER_SMTP_PASSWORD and is never sent over an unencrypted connection.

Replies are judged by outcome.smtp_outcome, by the command they answer. 421 or a dropped
connection before the content went out: the message is tried once more on a new
connection. A drop after the content went out but before the reply: uncertain, since the
server may have taken it; it is never resent by itself.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from dataclasses import dataclass

from ..config import Smtp
from ..errors import SendError
from ..message import Message
from ..outcome import DATA, MAIL, RCPT, smtp_outcome, uncertain, unreachable
from .base import SENT, Backend, Outcome, Worker

LOOPBACK = ("localhost", "127.0.0.1", "::1")


class ConnectionLost(Exception):
    """The server closed the connection (or said 421) before the message was accepted."""

    def __init__(self, reply: str, content_sent: bool = False):
        super().__init__(reply)
        self.reply = reply
        self.content_sent = content_sent


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

    # -- talking ---------------------------------------------------------------------------

    async def read_reply(self) -> Reply:
        try:
            async with asyncio.timeout(self.timeout):  # a timer, not a task as wait_for makes
                return await self._read_reply()
        except TimeoutError:
            raise ConnectionLost(f"no reply within {self.timeout:g} s") from None

    async def _read_reply(self) -> Reply:
        """One reply, without a timeout of its own: the caller sets one."""
        lines = []
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    raise ConnectionLost("connection closed by the server")
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if len(text) < 3 or not text[:3].isdigit():
                    raise ConnectionLost(f"not an SMTP reply: {text[:80]!r}")
                lines.append(text[4:])
                if text[3:4] != "-":
                    break
        except (ConnectionError, OSError) as exc:
            raise ConnectionLost(f"connection lost: {exc}") from exc
        reply = Reply(int(text[:3]), tuple(lines))
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
        where = f"{settings.host}:{settings.port}"
        context = tls_context(settings) if settings.security in ("ssl", "starttls") else None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                settings.host, settings.port,
                ssl=context if settings.security == "ssl" else None,
                server_hostname=settings.host if settings.security == "ssl" else None,
            ), settings.timeout)
        except ssl.SSLError as exc:
            raise SendError(f"smtp {where}: TLS failed: {exc.reason or exc}") from exc
        except (OSError, asyncio.TimeoutError) as exc:
            raise SendError(f"smtp {where}: cannot connect: {exc or 'timed out'}") from exc
        conn = cls(reader, writer, settings.timeout)
        try:
            await conn._greet(settings, context)
        except ConnectionLost as exc:
            conn.abort()
            raise SendError(f"smtp {where}: {exc.reply}") from exc
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _greet(self, settings: Smtp, context: ssl.SSLContext | None) -> None:
        where = f"smtp {settings.host}:{settings.port}"
        greeting = await self.read_reply()
        if greeting.code != 220:
            raise SendError(f"{where}: the server will not talk: {greeting}")
        helo = settings.helo_name or socket.getfqdn() or "localhost"
        await self._ehlo(helo, where)
        if settings.security == "starttls":
            if "STARTTLS" not in self.extensions:
                raise SendError(f"{where}: the server does not offer STARTTLS; refusing to send in the clear "
                                "(set smtp.security = \"none\" only for a trusted relay)")
            reply = await self.command("STARTTLS")
            if reply.code != 220:
                raise SendError(f"{where}: STARTTLS refused: {reply}")
            try:
                await asyncio.wait_for(self.writer.start_tls(context, server_hostname=settings.host),
                                       settings.timeout)
            except ssl.SSLCertVerificationError as exc:
                raise SendError(f"{where}: the server's certificate is not trusted: {exc.verify_message}") from exc
            except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
                raise SendError(f"{where}: TLS failed: {exc}") from exc
            await self._ehlo(helo, where)
        if settings.username:
            await self._login(settings, where)

    async def _ehlo(self, helo: str, where: str) -> None:
        reply = await self.command(f"EHLO {helo}")
        if reply.code != 250:
            raise SendError(f"{where}: EHLO refused: {reply}")
        self.extensions = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.partition(" ")
            self.extensions[keyword.upper()] = params

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
        if reply.code != 235:
            raise SendError(f"{where}: login refused: {reply}")

    # -- sending ---------------------------------------------------------------------------

    async def send(self, message: Message) -> Outcome:
        envelope = [f"MAIL FROM:<{message.sender}>", f"RCPT TO:<{message.recipient}>", "DATA"]
        if "PIPELINING" in self.extensions:
            self.write("".join(f"{line}\r\n" for line in envelope).encode("ascii"))
            try:
                async with asyncio.timeout(self.timeout):  # one timer for the three replies
                    await self.drain()
                    replies = [await self._read_reply() for _ in envelope]
            except TimeoutError:
                raise ConnectionLost(f"no reply within {self.timeout:g} s") from None
        else:
            replies = []
            for line in envelope:
                replies.append(await self.command(line))
                if replies[-1].code >= 400:
                    break
        refused = next((i for i, r in enumerate(replies) if r.code >= 400 and r.code != 354), None)
        if refused is not None:
            if replies[-1].code == 354:  # a server that said yes to DATA anyway: end it empty
                await self.command(".")
            await self.reset()
            return smtp_outcome(replies[refused].code, replies[refused].text, (MAIL, RCPT, DATA)[refused])
        # Dot-stuffing: a line that starts with "." gets another one. Our own messages
        # have none (quoted-printable writes =2E), so this is a scan, not a copy.
        data = message.data
        if data.startswith(b".") or b"\r\n." in data:
            data = (b"." if data.startswith(b".") else b"") + data.replace(b"\r\n.", b"\r\n..")
        self.write(data)
        self.write(b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n")
        try:
            await self.drain()
            reply = await self.read_reply()
        except ConnectionLost as exc:
            raise ConnectionLost(exc.reply, content_sent=True) from exc
        return smtp_outcome(reply.code, reply.text, DATA)

    async def reset(self) -> None:
        await self.command("RSET")

    async def quit(self) -> None:
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


class SmtpWorker(Worker):
    def __init__(self, settings: Smtp):
        self.settings = settings
        self.conn: SmtpConnection | None = None
        self.used = 0

    async def send(self, message: Message) -> Outcome:
        for attempt in (1, 2):
            if self.conn is None or self.used >= self.settings.messages_per_connection:
                await self._reconnect()
            self.used += 1
            try:
                return await self.conn.send(message)
            except ConnectionLost as exc:
                self.conn.abort()
                self.conn = None
                if exc.content_sent:  # it may have been delivered: never resent by itself
                    return uncertain(f"{exc.reply} (after the message was sent, before the reply)")
                if attempt == 2:
                    return unreachable(exc.reply)
        raise AssertionError("unreachable")

    async def _reconnect(self) -> None:
        if self.conn is not None:
            await self.conn.quit()
        self.conn = await SmtpConnection.open(self.settings)
        self.used = 0

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.quit()
            self.conn = None


class SmtpBackend(Backend):
    name = "smtp"

    def __init__(self, settings: Smtp):
        self.settings = settings
        self.connections = settings.connections

    async def open_worker(self) -> Worker:
        worker = SmtpWorker(self.settings)
        await worker._reconnect()  # fail fast: a wrong host or password stops the run here
        return worker

    def describe(self) -> str:
        s = self.settings
        return f"smtp {s.host}:{s.port} ({s.security}, {s.connections} connection{'s' * (s.connections != 1)})"


__all__ = ["SmtpBackend", "SmtpConnection", "SmtpWorker", "SENT", "ConnectionLost"]
