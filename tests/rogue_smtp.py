"""A small SMTP server on loopback, plain sockets and ssl in a thread, that misbehaves on cue:
it injects bytes after its 220 to STARTTLS, sends over-long or garbled replies, refuses EHLO,
421s or drops chosen connections, or goes away. Otherwise it speaks enough SMTP (EHLO, HELO,
STARTTLS, AUTH PLAIN, MAIL, RCPT, DATA, RSET, NOOP, QUIT; pipelining works, as it answers
line by line) to deliver, so a test can tell a refusal from a send.

`hook(n, verb)` is asked before each reply, with n the connection's number (1, 2, ...) and
verb "GREETING", "EHLO", "HELO", "STARTTLS" (the bytes after the 220), "STARTTLS-REPLY" (a
reply instead of the 220, and no TLS), "MAIL", "RCPT", "CONTENT" (asked after the first line
of the message: "drop" hangs up in the middle of DATA), "DATA" (the reply to the content),
"AUTH"; it returns bytes to send instead, "drop" to close the
connection, "vanish" to close it and stop listening (later connections are refused), or
None to behave."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from smtp_server import free_port


@dataclass
class Session:
    number: int
    commands: list[str] = field(default_factory=list)  # as the server read them
    tls: bool = False


class _Closed(Exception):
    pass


class RogueServer:
    def __init__(self, tls: tuple[Path, Path] | None = None, hook: Callable | None = None, port: int | None = None,
                 auth: tuple[str, str] | None = None, pipelining: bool = True):
        self.port = port or free_port()
        self.hook = hook or (lambda n, verb: None)
        self.auth, self.pipelining = auth, pipelining
        self.context = None
        if tls:
            self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.context.load_cert_chain(str(tls[0]), str(tls[1]))
        self.sessions: list[Session] = []
        self.received: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None

    def delivered(self) -> Counter:
        with self.lock:
            return Counter(r for r, _ in self.received)

    def commands(self) -> list[str]:
        return [c for s in self.sessions for c in s.commands]

    def __enter__(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.vanish()

    def vanish(self) -> None:
        """Stop listening: connections are refused from now on."""
        listener, self.listener = self.listener, None
        if listener:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()

    def _accept(self) -> None:
        while (listener := self.listener) is not None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self.lock:
                session = Session(len(self.sessions) + 1)
                self.sessions.append(session)
            threading.Thread(target=self._serve, args=(conn, session), daemon=True).start()

    # -- one connection ----------------------------------------------------------------------

    def _serve(self, conn: socket.socket, session: Session) -> None:
        conn.settimeout(10)
        try:
            self._talk(conn, session)
        except (_Closed, OSError, ssl.SSLError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _reply(self, conn, session, verb: str, default: bytes):
        custom = self.hook(session.number, verb)
        if custom == "vanish":
            self.vanish()
            raise _Closed
        if custom == "drop":
            raise _Closed
        conn.sendall(custom if custom is not None else default)
        return custom

    def _talk(self, conn, session: Session) -> None:
        buffer = bytearray()

        def readline() -> bytes:
            nonlocal buffer
            while b"\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    raise _Closed
                buffer += chunk
            i = buffer.index(b"\n") + 1
            line, buffer = bytes(buffer[:i]), buffer[i:]
            return line

        self._reply(conn, session, "GREETING", b"220 rogue.test ESMTP\r\n")
        mail_from, rcpts = None, []
        while True:
            line = readline().decode("utf-8", "replace").rstrip("\r\n")
            session.commands.append(line)
            verb = line.split(" ", 1)[0].upper()
            if verb == "EHLO":
                ext = ["rogue.test"]
                if self.pipelining:
                    ext.append("PIPELINING")
                if self.context and not session.tls:
                    ext.append("STARTTLS")
                if self.auth:
                    ext.append("AUTH PLAIN")
                ext.append("8BITMIME")
                text = "".join(f"250{'-' if i < len(ext) - 1 else ' '}{e}\r\n" for i, e in enumerate(ext))
                self._reply(conn, session, "EHLO", text.encode())
            elif verb == "HELO":
                self._reply(conn, session, "HELO", b"250 rogue.test\r\n")
            elif verb == "STARTTLS" and self.context and not session.tls and \
                    (refusal := self.hook(session.number, "STARTTLS-REPLY")) is not None:
                conn.sendall(refusal)
            elif verb == "STARTTLS" and self.context and not session.tls:
                # the injection in the same write as the 220, as an attacker's packet would be;
                # ("later", seconds, bytes): in a packet of its own, that much later
                injection = self.hook(session.number, "STARTTLS") or b""
                if isinstance(injection, tuple):
                    _, delay, late = injection
                    conn.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                    time.sleep(delay)
                    conn.sendall(late)
                else:
                    conn.sendall(b"220 2.0.0 Ready to start TLS\r\n" + injection)
                conn = self.context.wrap_socket(conn, server_side=True)
                session.tls = True
                buffer = bytearray()  # what a careful server does: nothing from before the handshake
            elif verb == "AUTH":
                self._reply(conn, session, "AUTH", b"235 2.7.0 Authentication successful\r\n")
            elif verb == "MAIL":
                mail_from, rcpts = line, []
                self._reply(conn, session, "MAIL", b"250 2.1.0 Ok\r\n")
            elif verb == "RCPT":
                address = line.split(":", 1)[1].strip().strip("<>")
                if self._reply(conn, session, "RCPT", b"250 2.1.5 Ok\r\n") is None:
                    rcpts.append(address)
            elif verb == "DATA":
                if not mail_from or not rcpts:
                    conn.sendall(b"554 5.5.1 Error: no valid recipients\r\n")
                    continue
                conn.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                data = bytearray()
                while (chunk := readline()) != b".\r\n":
                    if not data and self.hook(session.number, "CONTENT") == "drop":
                        raise _Closed  # in the middle of the message: no reply, nothing taken
                    data += chunk[1:] if chunk.startswith(b"..") else chunk
                if self._reply(conn, session, "DATA", b"250 2.0.0 Ok: queued\r\n") is None:
                    with self.lock:
                        self.received += [(r, bytes(data)) for r in rcpts]
                mail_from, rcpts = None, []
            elif verb == "RSET":
                mail_from, rcpts = None, []
                conn.sendall(b"250 2.0.0 Ok\r\n")
            elif verb == "NOOP":
                conn.sendall(b"250 2.0.0 Ok\r\n")
            elif verb == "QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                raise _Closed
            else:
                conn.sendall(b"502 5.5.2 Error: command not recognized\r\n")
