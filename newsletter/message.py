"""Per-recipient messages from one rendered issue: RFC 5322 bytes, built by splicing.

Everything that is the same for every recipient (headers, both bodies, already
quoted-printable encoded) is prepared once in ``MessageFactory``; ``build`` only encodes
the few values that differ (To, Message-ID, Date, the unsubscribe URL, merge fields and,
if it has merge fields, the Subject) and joins bytes.
Building with the ``email`` package costs about 2 ms a message; this costs a few µs.

The message: multipart/alternative, text/plain then text/html, both UTF-8 and
quoted-printable (7-bit clean), CRLF line ends, no line over 76 octets in the bodies.
Each placeholder's value is encoded on lines of its own, joined by soft line breaks, so
the encoded bodies around it never change.
"""

from __future__ import annotations

import binascii
import datetime as dt
import hashlib
import html
import json
import re
import time
from functools import cached_property
from email import quoprimime
from email.header import Header
from email.utils import format_datetime, formataddr

from . import merge
from .checks import one_line_problem
from .config import Config, Dkim
from .errors import ConfigError
from .render import PLACEHOLDERS, Rendered
from .tokens import Signer

CRLF = b"\r\n"
_LINE_START_DOT = re.compile(r"^\.", re.MULTILINE)
_HEADER_BREAK = re.compile("[\r\n\x00\x85\u2028\u2029]")
_FOLD_POINT = re.compile(r"(?<=\S) (?=\S)")
SOFT_BREAK = b"=\r\n"
QP_LINE = 76  # RFC 2045: encoded lines at most 76 characters
UNSUBSCRIBE = PLACEHOLDERS["unsubscribe_url"]


def _qp(text: str) -> bytes:
    """Quoted-printable for a body or a piece of one, once per issue: the stdlib's encoder
    (email.quoprimime), which breaks lines at CRLF, CR and LF alike, never cuts an =XX
    escape and encodes white space before a line end. Encoded lines are CRLF-ended and at
    most 73 octets, keeping 3 free: 2 for "=2E" below, 1 for the soft line break that
    _SplicedBody puts after a piece."""
    encoded = quoprimime.body_encode(text.encode("utf-8").decode("latin-1"), QP_LINE - 3, "\r\n")
    # No line starts with "." (SMTP would have to double it): =2E is the same character,
    # so a message needs no dot-stuffing per recipient.
    return _LINE_START_DOT.sub("=2E", encoded).encode("ascii")


def _qp_value(value: str) -> bytes:
    """A per-recipient value, quoted-printable, ending in a soft line break so the next
    piece goes on. Per recipient, so the usual value (a URL of one or two lines) takes the C
    encoder, and whatever of its output we cannot vouch for goes the per-issue way."""
    encoded = binascii.b2a_qp(value.encode("utf-8"))
    # b2a_qp breaks lines with a bare LF after "=", passes a lone CR or a hard line break
    # through, may start a line with "." and may end with a 77-octet line (74 characters
    # and a space as =20): checked here, in that order.
    if (b"\r" not in encoded and encoded.count(b"\n") == encoded.count(b"=\n")
            and b"\n." not in encoded and encoded[:1] != b"."
            and len(encoded) - encoded.rfind(b"\n") <= QP_LINE):  # last line + "=" within 76
        return encoded.replace(b"\n", CRLF) + SOFT_BREAK
    return _close_line(_qp(value))


def _close_line(encoded: bytes) -> bytes:
    """End a piece with a soft line break unless it ends a line already (or is empty)."""
    return encoded if encoded.endswith(CRLF) or not encoded else encoded + SOFT_BREAK


_date_cache: tuple[int, bytes] = (0, b"")


def _date_now() -> bytes:
    """The Date header's value for now, formatted once a second rather than per message."""
    global _date_cache
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache = (second, format_datetime(dt.datetime.fromtimestamp(second, dt.timezone.utc)).encode("ascii"))
    return _date_cache[1]


def _header(name: str, value: str, encode: bool = False) -> bytes:
    """One header line: non-ASCII values RFC 2047-encoded, long ones folded at spaces."""
    if encode or not value.isascii():
        value = Header(value, "utf-8", header_name=name, maxlinelen=76).encode(linesep="\r\n")
        return f"{name}: {value}".encode("ascii") + CRLF
    return _fold(f"{name}: {value}").encode("ascii") + CRLF


def display_address(name: str | None, address: str) -> str:
    if not name or one_line_problem(name):
        return address
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + f'" <{address}>'


def _encoded_words(text: str, header_name: str) -> str:
    """RFC 2047 encoded words of at most 75 characters, separated by spaces (folded
    later); the first one short enough to share a line with the header's name."""
    return " ".join(Header(text, "utf-8", maxlinelen=76, header_name=header_name).encode(linesep=" ").split())


def _fold(line: str, width: int = 78) -> str:
    """Fold an ASCII header at spaces so that no line is longer than `width` where it can be."""
    if len(line) <= width:
        return line
    # Fold only at a single space between two words: never right after "Name:", and
    # never so that a line is nothing but white space (RFC 5322 section 3.2.2).
    words = _FOLD_POINT.split(line)
    if len(words) > 1 and words[0].endswith(":"):
        words[:2] = [f"{words[0]} {words[1]}"]
    lines, current = [], words[0]
    for word in words[1:]:
        if len(current) + 1 + len(word) > width:
            lines.append(current)
            current = " " + word
        else:
            current = f"{current} {word}"
    lines.append(current)
    return "\r\n".join(lines)


def _address(name: str | None, address: str) -> str:
    """`Name <address>` for a header: an ASCII name quoted as needed, any other encoded
    as RFC 2047 words of at most 75 characters (folded by _header); a name that could
    break the header is dropped, never passed through."""
    if not name or one_line_problem(name):
        return address
    if name.isascii():
        return formataddr((name, address))
    return f"{_encoded_words(name, 'To')} <{address}>"


class _Holes:
    """The placeholders of one issue and their slots in a message's `values`: the
    unsubscribe URL first, then each merge field by number."""

    def __init__(self, merge_count: int):
        self.placeholders = [UNSUBSCRIBE] + [merge.PLACEHOLDER % i for i in range(merge_count)]
        self.slot = {p: i for i, p in enumerate(self.placeholders)}
        self.pattern = re.compile("(" + "|".join(map(re.escape, self.placeholders)) + ")")

    def split(self, text: str) -> tuple[list[str], list[int]]:
        """The text around the holes, and each hole's slot."""
        found = self.pattern.split(text)
        return found[::2], [self.slot[p] for p in found[1::2]]

    def sub(self, text: str, values, escape: bool = False) -> str:
        if escape:
            return self.pattern.sub(lambda m: html.escape(values[self.slot[m[0]]], quote=True), text)
        return self.pattern.sub(lambda m: values[self.slot[m[0]]], text)


class _SplicedBody:
    """A body encoded once, with holes where per-recipient values go."""

    def __init__(self, text: str, escape_values: bool, holes: _Holes):
        pieces, self.slots = holes.split(text)
        self.pieces = [_close_line(_qp(p)) for p in pieces[:-1]] + [_qp(pieces[-1])]
        self.escape = escape_values
        self.one_slot = len(set(self.slots)) <= 1  # the common case: the unsubscribe URL alone

    def _encode(self, value: str) -> bytes:
        return _qp_value(html.escape(value, quote=True) if self.escape else value)

    def fill(self, values) -> bytes:
        """`values` by slot (see _Holes)."""
        if len(self.pieces) == 1:
            return self.pieces[0]
        if self.one_slot:
            return self._encode(values[self.slots[0]]).join(self.pieces)
        encoded: dict[int, bytes] = {}
        parts = [self.pieces[0]]
        for slot, piece in zip(self.slots, self.pieces[1:]):
            if slot not in encoded:
                encoded[slot] = self._encode(values[slot])
            parts += (encoded[slot], piece)
        return b"".join(parts)


class _JsonBody:
    """A body as the inside of a JSON string, UTF-8, encoded once, with holes for the
    values: Postmark and Resend take every message's whole HTML, and json.dumps and
    encoding 40 KB per message would cost more than everything else."""

    def __init__(self, text: str, escape_values: bool, holes: _Holes):
        pieces, self.slots = holes.split(text)
        self.pieces = [json.dumps(piece, ensure_ascii=False)[1:-1].encode("utf-8") for piece in pieces]
        self.escape = escape_values

    def fill(self, values) -> list[bytes]:
        """The pieces and the values between them, for the request's one join."""
        encoded: dict[int, bytes] = {}
        parts = [self.pieces[0]]
        for slot, piece in zip(self.slots, self.pieces[1:]):
            if slot not in encoded:
                value = html.escape(values[slot], quote=True) if self.escape else values[slot]
                encoded[slot] = json.dumps(value, ensure_ascii=False)[1:-1].encode("utf-8")
            parts += (encoded[slot], piece)
        return parts


class Message:
    """One recipient's message. What a backend needs is made on first use: the whole
    RFC 5322 bytes (SMTP, outbox, SES) or the parts (the HTTP APIs that take fields)."""

    # No line of `data` starts with ".": the bodies' quoted-printable writes =2E there (_qp,
    # _qp_value), and every header line starts with a name or folding white space. So SMTP
    # need not scan 40 KB a message for dot-stuffing; tests/test_bodies.py holds us to it.
    needs_dot_stuffing = False

    def __init__(self, factory: "MessageFactory", recipient: str, name: str | None, rkey: str,
                 now: dt.datetime | None = None, fields: dict | None = None):
        self.factory = factory
        self.recipient = recipient  # envelope RCPT TO
        self.name = name
        self.rkey = rkey
        self.message_id = f"<{factory.id_prefix}.{rkey}@{factory.domain}>"
        token = factory.signer.token(rkey)
        # envelope MAIL FROM; with VERP ([send] bounce_address) it names this reader, for `newsletter inbox`
        self.sender = factory.envelope_sender.replace("{token}", token) if factory.verp else factory.envelope_sender
        self.unsubscribe_url = factory.unsubscribe_url.replace("{token}", token)
        entries = [f"<{self.unsubscribe_url}>"]
        if factory.unsubscribe_mailto:
            # the token is URL-safe base64: only the space needs escaping
            entries.append(f"<mailto:{factory.unsubscribe_mailto}?subject=unsubscribe%20{token}>")
        self.list_unsubscribe = ", ".join(entries)  # never encoded: RFC 8058 readers need it literal
        self._now = now
        # What goes into the holes, by slot: the unsubscribe URL, then each merge field's
        # value (one line, see merge.clean) or its fallback.
        self.values = (self.unsubscribe_url, *factory.merge_values(recipient, name, fields)) if factory.merges \
            else (self.unsubscribe_url,)

    @property
    def subject(self) -> str:
        """This recipient's subject, plain UTF-8 (merge fields filled in)."""
        f = self.factory
        return f.holes.sub(f.subject, self.values) if f.subject_merged else f.subject

    @property
    def to(self) -> str:
        """`Name <address>` as a header value, RFC 2047-encoded where needed."""
        return _address(self.name, self.recipient)

    @property
    def display_to(self) -> str:
        """`"Name" <address>` in plain UTF-8, for APIs that encode headers themselves."""
        return display_address(self.name, self.recipient)

    @property
    def merge_values(self) -> tuple[str, ...]:
        """Each merge field's value for this recipient, by number (Rendered.merges)."""
        return self.values[1:]

    @property
    def html(self) -> str:
        return self.factory.holes.sub(self.factory.rendered.html, self.values, escape=True)

    @property
    def text(self) -> str:
        return self.factory.holes.sub(self.factory.rendered.text, self.values)

    @property
    def html_json(self) -> list[bytes]:
        """`html` as the inside of a JSON string, UTF-8, in pieces to be joined (see _JsonBody)."""
        return self.factory.json_bodies[1].fill(self.values)

    @property
    def text_json(self) -> list[bytes]:
        return self.factory.json_bodies[0].fill(self.values)

    def headers(self) -> dict[str, str]:
        """The headers a provider API is given besides From, To, Subject and Reply-To."""
        return {"List-Unsubscribe": self.list_unsubscribe,
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                "List-Id": self.factory.list_id,
                "X-Newsletter-Message-Id": self.message_id.strip("<>")}

    @cached_property
    def data(self) -> bytes:
        """The whole message, CRLF line ends, not dot-stuffed; DKIM-signed if configured."""
        f = self.factory
        data = b"".join((
            _header("To", self.to),
            b"Date: ", format_datetime(self._now).encode("ascii") if self._now else _date_now(), CRLF,
            b"Message-ID: ", self.message_id.encode("ascii"), CRLF,
            # "=?" in a merged value would read as an encoded word: encode the whole subject then
            _header("Subject", subject, "=?" in subject) if f.subject_merged and (subject := self.subject) else b"",
            f.common_headers,
            b"List-Unsubscribe: ", self.list_unsubscribe.replace(", ", ",\r\n ").encode("ascii"), CRLF,
            b"\r\nThis is a multipart message in MIME format.\r\n",
            f.text_start, f.text.fill(self.values),
            f.html_start, f.html.fill(self.values),
            f.end,
        ))
        return f.dkim.sign(data) if f.dkim else data


class MessageFactory:
    def __init__(self, rendered: Rendered, config: Config, signer: Signer, test_send: bool = False):
        self.dkim = _DkimSigner(config.dkim) if config.dkim.enabled else None
        pub, sender = config.publication, config.sender
        if not pub.unsubscribe_url:
            raise ConfigError([f"{config.path}: publication.unsubscribe_url: required to send "
                               "(one-click unsubscribe URL with {token}, e.g. https://example.com/u/{token})"])
        # Settings are checked when read; a value that could start a header line of its own
        # is refused here too, whoever built the Config.
        for setting, value in (("sender.name", sender.name), ("sender.address", sender.address),
                               ("sender.reply_to", sender.reply_to), ("publication.name", pub.name),
                               ("publication.list_id", pub.list_id), ("publication.unsubscribe_url", pub.unsubscribe_url),
                               ("publication.unsubscribe_mailto", pub.unsubscribe_mailto),
                               ("send.bounce_address", config.send.bounce_address)):
            if value and (found := _HEADER_BREAK.search(value)):
                raise ConfigError([f"{config.path}: {setting}: holds a line break or NUL (U+{ord(found[0]):04X}), "
                                   "which could start a header of its own"])
        self.rendered = rendered
        self.signer = signer
        self.unsubscribe_url = pub.unsubscribe_url
        self.unsubscribe_mailto = pub.unsubscribe_mailto
        self.domain = sender.domain
        self.from_email = sender.address
        self.envelope_sender = config.send.bounce_address or sender.address
        self.verp = "{token}" in self.envelope_sender
        digest = hashlib.sha256(rendered.html.encode("utf-8") + rendered.text.encode("utf-8")).hexdigest()
        self.digest = digest
        # Stable per issue and recipient: a message sent again after a crash keeps its
        # Message-ID, which lets receiving systems drop the duplicate. Test sends differ.
        self.id_prefix = f"{rendered.issue.stem}.{digest[:10]}" + (".test" if test_send else "")
        self.boundary = f"=_nl_{digest[:32]}"  # "=_" never occurs in quoted-printable text
        self.test_send = test_send
        self.subject = ("[TEST] " if test_send else "") + rendered.subject
        self.holes = _Holes(len(rendered.merges))
        # (field as written, lower-cased, fallback) for each merge field, by number
        self.merges = [(field, field.lower(), merge.clean(fallback)) for field, fallback in rendered.merges]
        self.subject_merged = any(p in self.subject for p in self.holes.placeholders[1:])
        self.from_address = _address(sender.name, sender.address)
        self.display_from = display_address(sender.name, sender.address)
        self.sender_name = sender.name
        self.reply_to = sender.reply_to
        self.list_id = f"{_list_name(pub.name)} <{pub.list_id}>"

        head = [
            _header("From", self.from_address),
            _header("Reply-To", sender.reply_to) if sender.reply_to else b"",
            b"" if self.subject_merged else _header("Subject", self.subject),  # else per recipient
            b"MIME-Version: 1.0\r\n",
            _header("List-Id", self.list_id),
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
            f'Content-Type: multipart/alternative; boundary="{self.boundary}"\r\n'.encode("ascii"),
        ]
        self.common_headers = b"".join(head)
        b = self.boundary.encode("ascii")
        part_head = b'Content-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
        self.text_start = b"\r\n--" + b + b"\r\n" + part_head % b"plain"
        self.html_start = b"\r\n--" + b + b"\r\n" + part_head % b"html"
        self.end = b"\r\n--" + b + b"--\r\n"
        self.text = _SplicedBody(rendered.text, False, self.holes)
        self.html = _SplicedBody(rendered.html, True, self.holes)

    @cached_property
    def json_bodies(self) -> tuple[_JsonBody, _JsonBody]:
        """(text, html) for the JSON APIs; made on first use, once per issue."""
        return _JsonBody(self.rendered.text, False, self.holes), _JsonBody(self.rendered.html, True, self.holes)

    @cached_property
    def fallback_subject(self) -> str:
        """The subject with every merge field's fallback, as a proof without a subscriber shows it."""
        return self.holes.sub(self.subject, ("", *(fallback for _, _, fallback in self.merges)))

    def merge_values(self, email: str, name: str | None, fields: dict | None) -> list[str]:
        return [merge.lookup(field, key, email, name, fields) or fallback for field, key, fallback in self.merges]

    def build(self, email: str, name: str | None, rkey: str, now: dt.datetime | None = None,
              fields: dict | None = None) -> Message:
        """`fields`: the subscriber's merge fields (their CSV row's other columns); None for
        a proof, which shows each field's fallback."""
        return Message(self, email, name, rkey, now, fields)


class _DkimSigner:
    """relaxed/relaxed: a relay that refolds a header or changes white space (many do) does
    not break the signature. The headers a reader trusts are over-signed (RFC 6376 section
    8.15): named once more than they occur, so nobody can add a second From or Subject."""

    # List-Unsubscribe and List-Unsubscribe-Post must be signed for one-click unsubscribe
    # to count (RFC 8058 section 4); dkimpy leaves them out unless asked.
    HEADERS = [b"from", b"to", b"subject", b"date", b"message-id", b"reply-to", b"mime-version",
               b"content-type", b"list-id", b"list-unsubscribe", b"list-unsubscribe-post"]
    OVERSIGNED = {b"from", b"to", b"subject", b"date", b"message-id", b"reply-to", b"list-id",
                  b"list-unsubscribe", b"list-unsubscribe-post"}
    _NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.M)

    def __init__(self, settings: Dkim):
        import dkim  # only when signing: dkimpy is not needed otherwise

        self._sign = dkim.sign
        self.selector = settings.selector.encode("ascii")
        self.domain = settings.domain.encode("ascii")
        self.key = settings.private_key.encode("ascii")

    def include_headers(self, data: bytes) -> list[bytes]:
        """Each header as often as it occurs (dkimpy signs the last n), the over-signed ones
        once more: the extra name matches nothing at signing and any added copy at verifying."""
        found = [n.lower() for n in self._NAME.findall(data[:data.find(b"\r\n\r\n") + 2])]
        names = []
        for name in self.HEADERS:
            names += [name] * (found.count(name) + (name in self.OVERSIGNED))
        return names

    def sign(self, data: bytes) -> bytes:
        signature = self._sign(data, self.selector, self.domain, self.key, canonicalize=(b"relaxed", b"relaxed"),
                               include_headers=self.include_headers(data), linesep=b"\r\n")
        return signature + data


def _list_name(name: str) -> str:
    """List-Id's phrase (RFC 2919): as is, quoted, or RFC 2047-encoded; the <id> stays literal."""
    if not name.isascii():
        return _encoded_words(name, "List-Id")
    if all(c.isalnum() or c in " !#$%&'*+-/=?^_`{|}~" for c in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
