"""The per-recipient message, checked on its real bytes: MIME structure, the spliced
bodies, the headers a good newsletter needs (DESIGN.md, "What a good newsletter message
is"), the unsubscribe token and the DKIM signature."""

import base64
import datetime as dt
import email
import email.policy
import hmac
import html
import json
import os
import random
import re
import string
import subprocess
from dataclasses import replace
from email.header import decode_header, make_header
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest

from conftest import require
from newsletter.message import MessageFactory
from newsletter.render import PLACEHOLDERS
from newsletter.tokens import Signer, TokenError

PLACEHOLDER = PLACEHOLDERS["unsubscribe_url"]
GREETING = "{{m:0}}"  # the example templates' one merge field: subscriber.name, or "there"
ADA = "ada@example.com"
SECRET = b"test-secret"
AMP_URL = "https://x.example/u?list=a&t={token}"
ONE_OF_EACH = ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "List-Id",
               "List-Unsubscribe", "List-Unsubscribe-Post")


# -- helpers -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signer(config):
    return Signer(SECRET, config.publication.list_id)


def with_unsubscribe_url(config, url):
    return replace(config, publication=replace(config.publication, unsubscribe_url=url))


def build(rendered, config, signer, address=ADA, name="Ada Lovelace", test_send=False, now=None):
    factory = MessageFactory(rendered, config, signer, test_send=test_send)
    return factory.build(address, name, signer.recipient_key(address), now=now)


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def head_and_body(data: bytes) -> tuple[bytes, bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, "no empty line (CRLF CRLF) between the headers and the body"
    return head, body


def raw_headers(data: bytes) -> list[tuple[str, bytes]]:
    """(name, raw value with folding kept) for each header line, in order."""
    head, _ = head_and_body(data)
    fields = re.split(rb"\r\n(?![ \t])", head)
    out = []
    for f in fields:
        name, colon, value = f.partition(b":")
        assert colon, f"not a header line: {f!r}"
        out.append((name.decode("ascii"), value.lstrip(b" \t\r\n")))
    return out


def raw_header(data: bytes, name: str) -> bytes:
    found = [v for n, v in raw_headers(data) if n.lower() == name.lower()]
    assert len(found) == 1, f"{name}: expected once, found {len(found)} times"
    return found[0]


def unfold(value: bytes) -> bytes:
    return re.sub(rb"\r\n([ \t])", rb"\1", value)


def unsubscribe_url(data: bytes) -> str:
    value = unfold(raw_header(data, "List-Unsubscribe")).decode("ascii")
    m = re.search(r"<(https://[^>]*)>", value)
    assert m, value
    return m.group(1)


def all_lines(data: bytes) -> list[bytes]:
    """Lines split at any line end, so one bug (bare LF) doesn't hide another (length)."""
    return re.split(rb"\r\n|\n|\r", data)


def canonical(text: str) -> bytes:
    """The decoded body as it travels: UTF-8 with CRLF line ends."""
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


class Anchors(HTMLParser):
    def __init__(self):
        super().__init__()
        self.found, self._open = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._open.append([dict(attrs).get("href"), ""])

    def handle_data(self, data):
        for a in self._open:
            a[1] += data

    def handle_endtag(self, tag):
        if tag == "a" and self._open:
            href, text = self._open.pop()
            self.found.append((href, " ".join(text.split())))


def anchors(markup: str) -> list[tuple[str, str]]:
    parser = Anchors()
    parser.feed(markup)
    return parser.found


# Texts that put the placeholder where the byte-splicing could go wrong.
TEXTS = {
    "start-of-line": "Intro line.\n{{unsubscribe_url}}\nAfter it.\n",
    "middle-of-long-line": "First line.\n" + "word " * 30 + "{{unsubscribe_url}} " + "more " * 30 + "\nEnd.\n",
    "one-long-line-no-newline": "a" * 200 + PLACEHOLDER + "b" * 200,
    "start-and-end-of-text": "{{unsubscribe_url}} middle\n{{unsubscribe_url}}",
    "spaces-around": "Unsubscribe: {{unsubscribe_url}} \n \n",
    "twice-in-a-row": "x\n{{unsubscribe_url}}{{unsubscribe_url}}\n",
    "non-ascii-around": "Zoë — {{unsubscribe_url}} — “done”\n",
    "equals-and-dots": "a=b\n.{{unsubscribe_url}}.\n=3D\n",
}
LONG_LINE_HTML = ("<html><body><p>" + "x" * 100 + '<a href="{{unsubscribe_url}}">Unsubscribe</a>'
                  + "y" * 100 + "</p></body></html>\n")


def variants(example):
    yield "example", example
    for key, text in TEXTS.items():
        yield key, replace(example, text=text)
    yield "html-long-line", replace(example, html=LONG_LINE_HTML)


# -- structure ----------------------------------------------------------------------------------

def test_multipart_alternative_text_then_html_utf8_quoted_printable(example, config, signer):
    data = build(example, config, signer).data
    msg = parse(data)
    assert msg.get_content_type() == "multipart/alternative"
    assert msg.is_multipart()
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    for part in parts:
        assert part.get_content_charset() == "utf-8"
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
        assert not part.is_multipart()
    assert not msg.defects and not any(p.defects for p in parts)
    # The raw bytes agree: exactly two body parts between the boundaries.
    boundary = msg.get_boundary().encode("ascii")
    assert data.count(b"\r\n--" + boundary + b"\r\n") == 2
    assert data.endswith(b"\r\n--" + boundary + b"--\r\n")


@pytest.mark.parametrize("case", ["example", *TEXTS, "html-long-line"])
def test_seven_bit_no_bare_cr_and_line_limits(example, config, signer, case):
    rendered = dict(variants(example))[case]
    for cfg in (config, with_unsubscribe_url(config, AMP_URL)):
        data = build(rendered, cfg, signer).data
        assert max(data) < 128, "every byte must be 7-bit"
        assert not re.search(rb"\r(?!\n)", data), "bare CR"
        assert max(len(line) for line in all_lines(data)) <= 998
        _, body = head_and_body(data)
        long = [line for line in all_lines(body) if len(line) > 76]
        assert not long, f"body lines over 76 octets: {long[:3]}"


# Regression (fixed in 09811d3): binascii.b2a_qp takes its line end from the first newline in its
# input, so a piece with none (the unsubscribe URL, HTML after the placeholder) got "=\n".
@pytest.mark.parametrize("case", ["example", *TEXTS, "html-long-line"])
def test_every_line_ends_in_crlf(example, config, signer, case):
    rendered = dict(variants(example))[case]
    for cfg in (config, with_unsubscribe_url(config, AMP_URL)):
        for name in (None, "Ada Lovelace", "Zoë O'Brien"):
            data = build(rendered, cfg, signer, name=name).data
            bare = [m.start() for m in re.finditer(rb"(?<!\r)\n", data)]
            assert not bare, f"{len(bare)} bare LF, first at: {data[bare[0] - 60:bare[0] + 10]!r}"


# Regression (fixed in 09811d3): '=' + CRLF was appended to a last line already 76 octets long.
@pytest.mark.parametrize("case", ["76-char-line-before-placeholder", "76-char-unsubscribe-url"])
def test_no_body_line_over_76_octets_at_the_splice(example, config, signer, case):
    if case == "76-char-line-before-placeholder":
        rendered, cfg = replace(example, text="x\n" + "a" * 76 + PLACEHOLDER + "\n"), config
    else:
        token_length = len(signer.token(signer.recipient_key(ADA)))
        url = "https://x.example/" + "p" * (76 - len("https://x.example//") - token_length) + "/{token}"
        cfg = with_unsubscribe_url(config, url)
        assert len(url.replace("{token}", "t" * token_length)) == 76
        rendered = example
    _, body = head_and_body(build(rendered, cfg, signer).data)
    long = [line for line in all_lines(body) if len(line) > 76]
    assert not long, long


# -- the spliced bodies -------------------------------------------------------------------------

@pytest.mark.parametrize("unsubscribe", ["default", "with-ampersand"])
@pytest.mark.parametrize("case", ["example", *TEXTS, "html-long-line"])
def test_decoded_bodies_are_the_rendered_ones_with_the_url(example, config, signer, case, unsubscribe):
    rendered = dict(variants(example))[case]
    cfg = config if unsubscribe == "default" else with_unsubscribe_url(config, AMP_URL)
    data = build(rendered, cfg, signer).data
    url = unsubscribe_url(data)
    assert url.startswith(cfg.publication.unsubscribe_url.split("{token}")[0])
    if unsubscribe == "with-ampersand":
        assert "&" in url and "&amp;" not in url
    text_part, html_part = parse(data).iter_parts()
    assert text_part.get_payload(decode=True) == canonical(
        rendered.text.replace(PLACEHOLDER, url).replace(GREETING, "Ada Lovelace"))
    assert html_part.get_payload(decode=True) == canonical(
        rendered.html.replace(PLACEHOLDER, html.escape(url)).replace(GREETING, "Ada Lovelace"))
    assert PLACEHOLDER.encode() not in data and GREETING.encode() not in data


def test_visible_unsubscribe_link_in_both_parts(example, config, signer):
    for cfg in (config, with_unsubscribe_url(config, AMP_URL)):
        data = build(example, cfg, signer).data
        url = unsubscribe_url(data)
        text_part, html_part = parse(data).iter_parts()
        assert url in text_part.get_content()
        assert (url, "Unsubscribe") in anchors(html_part.get_content())


def test_each_recipient_gets_their_own_url(example, config, signer):
    factory = MessageFactory(example, config, signer)
    urls = set()
    for address in ("ada@example.com", "bob@example.com", "zoe@example.org"):
        data = factory.build(address, None, signer.recipient_key(address)).data
        url = unsubscribe_url(data)
        assert signer.verify(url.rsplit("/", 1)[1]) == signer.recipient_key(address)
        assert parse(data).iter_parts().__next__().get_payload(decode=True).count(url.encode()) == 1
        urls.add(url)
    assert len(urls) == 3


def test_message_parts_agree_with_the_bytes(example, config, signer):
    """The lazily made parts (for backends that take fields, not bytes) say what the bytes say."""
    for cfg in (config, with_unsubscribe_url(config, AMP_URL)):
        msg = build(example, cfg, signer, name="Zoë O'Brien")
        data = msg.data
        url = unsubscribe_url(data)
        assert msg.unsubscribe_url == url
        assert msg.text == example.text.replace(PLACEHOLDER, url).replace(GREETING, "Zoë O'Brien")
        assert msg.html == example.html.replace(PLACEHOLDER, html.escape(url)).replace(GREETING, "Zoë O&#x27;Brien")
        text_part, html_part = parse(data).iter_parts()
        assert text_part.get_payload(decode=True) == canonical(msg.text)
        assert html_part.get_payload(decode=True) == canonical(msg.html)
        headers = msg.headers()
        assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert headers["List-Unsubscribe"].encode("ascii") == unfold(raw_header(data, "List-Unsubscribe"))
        assert headers["List-Id"] == f"{cfg.publication.name} <{cfg.publication.list_id}>"
        assert parse(data)["To"].addresses[0].display_name == "Zoë O'Brien"
        assert msg.to.encode("ascii") == unfold(raw_header(data, "To"))


def test_random_texts_splice_exactly(example, config, signer):
    """Seeded random bodies and URLs: decoded exactly, CRLF only, lines within 76 octets."""
    rnd = random.Random(20240301)
    atoms = ["a", "b", " ", "  ", "\t", "=", "é", "—", "\U0001F600", "\n", "\n", ".", "From ", PLACEHOLDER,
             "x" * 70, "=3D", "&", "<a>"]
    for _ in range(150):
        text = "".join(rnd.choice(atoms) for _ in range(rnd.randint(0, 50)))
        markup = "".join(rnd.choice(atoms) for _ in range(rnd.randint(0, 50)))
        url = "https://x.example/" + "p" * rnd.randint(0, 90) + rnd.choice(["/{token}", "?a=1&t={token}"])
        rendered = replace(example, text=text, html=markup)
        data = build(rendered, with_unsubscribe_url(config, url), signer, name=None).data
        real_url = unsubscribe_url(data)
        text_part, html_part = parse(data).iter_parts()
        case = (text, markup, url)
        assert text_part.get_payload(decode=True) == canonical(text.replace(PLACEHOLDER, real_url)), case
        assert html_part.get_payload(decode=True) == canonical(markup.replace(PLACEHOLDER, html.escape(real_url))), case
        assert not re.search(rb"(?<!\r)\n|\r(?!\n)", data), case
        _, body = head_and_body(data)
        assert max(len(line) for line in body.split(b"\r\n")) <= 76, case


# -- headers ------------------------------------------------------------------------------------

def test_required_headers_present_exactly_once(example, config, signer):
    data = build(example, config, signer).data
    msg = parse(data)
    names = [n.lower() for n, _ in raw_headers(data)]
    for name in ONE_OF_EACH + ("Reply-To",):
        assert names.count(name.lower()) == 1, name
        assert len(msg.get_all(name)) == 1, name
    assert msg["From"].addresses[0].addr_spec == config.sender.address
    assert msg["From"].addresses[0].display_name == config.sender.name
    assert msg["To"].addresses[0].addr_spec == ADA
    assert msg["To"].addresses[0].display_name == "Ada Lovelace"
    assert msg["Reply-To"].addresses[0].addr_spec == config.sender.reply_to
    assert msg["Subject"] == example.subject
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime is not None
    assert not any(n.lower() == "bcc" for n in names)


def test_no_reply_to_when_not_configured(example, config, signer):
    cfg = replace(config, sender=replace(config.sender, reply_to=None))
    data = build(example, cfg, signer).data
    assert "reply-to" not in [n.lower() for n, _ in raw_headers(data)]
    for name in ONE_OF_EACH:
        raw_header(data, name)


def test_date_header_is_the_given_time(example, config, signer):
    now = dt.datetime(2024, 3, 1, 9, 30, tzinfo=dt.timezone.utc)
    data = build(example, config, signer, now=now).data
    assert raw_header(data, "Date") == b"Fri, 01 Mar 2024 09:30:00 +0000"


def test_list_unsubscribe_is_literal_https_and_mailto(example, config, signer):
    for cfg in (config, with_unsubscribe_url(config, AMP_URL)):
        data = build(example, cfg, signer).data
        raw = raw_header(data, "List-Unsubscribe")
        assert b"=?" not in raw
        value = unfold(raw).decode("ascii")
        m = re.fullmatch(r"<(https://[^<>\s]+)>,\s*<(mailto:[^<>\s]+)>", value)
        assert m, value
        token = signer.token(signer.recipient_key(ADA))
        assert m.group(1) == cfg.publication.unsubscribe_url.replace("{token}", token)
        assert m.group(2).startswith(f"mailto:{cfg.publication.unsubscribe_mailto}?")
        assert token in m.group(2)
        assert raw_header(data, "List-Unsubscribe-Post") == b"List-Unsubscribe=One-Click"
        assert b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in data


def test_list_id_is_name_and_angle_id(example, config, signer):
    data = build(example, config, signer).data
    raw = unfold(raw_header(data, "List-Id")).decode("ascii")
    assert raw == f"{config.publication.name} <{config.publication.list_id}>"
    assert re.fullmatch(r"[^<>]+ <[a-z0-9-]+(\.[a-z0-9-]+)+>", raw)


# Regression (fixed in 09811d3): the whole value, <list.id> included, was RFC 2047-encoded.
def test_list_id_stays_literal_with_a_non_ascii_name(example, config, signer):
    cfg = replace(config, publication=replace(config.publication, name="Brief für Zoë"))
    data = build(example, cfg, signer).data
    raw = unfold(raw_header(data, "List-Id"))
    assert raw.endswith(b" <" + cfg.publication.list_id.encode("ascii") + b">"), raw
    assert parse(data)["List-Id"] == f"Brief für Zoë <{cfg.publication.list_id}>"


# Regression (fixed in 09811d3): Header.encode()'s default linesep put a bare LF in List-Id.
def test_list_id_with_a_long_non_ascii_name_ends_lines_in_crlf(example, config, signer):
    name = "Le Bulletin de la Société Française des Études Économiques et Sociales"
    cfg = replace(config, publication=replace(config.publication, name=name))
    data = build(example, cfg, signer).data
    head, _ = head_and_body(data)
    assert not re.search(rb"(?<!\r)\n", head), head
    raw = unfold(raw_header(data, "List-Id")).decode("ascii")
    phrase, _, angle = raw.rpartition(" ")
    assert angle == f"<{cfg.publication.list_id}>"
    assert str(make_header(decode_header(phrase))) == name
    field = re.search(rb"^List-Id:.*?(?=\r\n(?![ \t]))", head + b"\r\n", re.S | re.M).group()
    assert max(len(line) for line in field.split(b"\r\n")) <= 78, field


# -- the token ----------------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["ada@example.com", "Zoe.OBrien+news@Example.COM",
                                     "xavier.quinn@sub.example.org"])
def test_token_is_opaque_and_verifies(example, config, signer, address):
    data = build(example, config, signer, address=address, name=None).data
    header = unfold(raw_header(data, "List-Unsubscribe")).decode("ascii")
    url = unsubscribe_url(data)
    local = address.split("@")[0]
    forms = {address, local, address.lower(), local.lower(), quote(address, safe=""), quote(address),
             quote(address.lower(), safe=""), quote(local, safe="")}
    for haystack in (header, header.lower(), url, url.lower()):
        for form in forms:
            assert form not in haystack, (form, haystack)
    token = url.rsplit("/", 1)[1]
    assert signer.verify(token) == signer.recipient_key(address)


def test_tampered_token_is_rejected(signer):
    token = signer.token(signer.recipient_key(ADA))
    middle = len(token) // 2
    for c in "Aa0-_":
        if c != token[middle]:
            with pytest.raises(TokenError):
                signer.verify(token[:middle] + c + token[middle + 1:])
    for bad in ("", "x", token[:-1], token + "A", token[1:], "!" * len(token)):
        with pytest.raises(TokenError):
            signer.verify(bad)


# Regression (fixed in 09811d3): non-canonical base64 (the last character's unused bits, '+' for '-',
# '/' for '_', '=' padding) gave other spellings of the same token.
def test_every_one_character_change_is_rejected(signer):
    token = signer.token(signer.recipient_key(ADA))
    accepted = []
    for i, old in enumerate(token):
        for c in string.ascii_letters + string.digits + "-_":
            if c == old:
                continue
            try:
                signer.verify(token[:i] + c + token[i + 1:])
                accepted.append((i, old, c))
            except TokenError:
                pass
    assert not accepted
    for other in (token.replace("-", "+"), token.replace("_", "/"), token + "=", token + "==", token + "\n"):
        if other != token:
            with pytest.raises(TokenError):
                signer.verify(other)


def test_token_of_another_secret_or_list_is_rejected(config, signer):
    rkey = signer.recipient_key(ADA)
    other_secret = Signer(b"another-secret", config.publication.list_id)
    other_list = Signer(SECRET, "another.list.example")
    for other in (other_secret, other_list):
        with pytest.raises(TokenError):
            signer.verify(other.token(rkey))
        with pytest.raises(TokenError):
            other.verify(signer.token(rkey))
    assert other_list.verify(other_list.token(rkey)) == rkey


# -- Message-ID -----------------------------------------------------------------------------------

def test_message_id_at_sender_domain_unique_and_stable(example, config, signer):
    factory = MessageFactory(example, config, signer)
    ids = {}
    for address in ("ada@example.com", "bob@example.com", "carol@example.org"):
        msg = factory.build(address, None, signer.recipient_key(address))
        header = parse(msg.data)["Message-ID"]
        assert header == msg.message_id
        assert re.fullmatch(r"<[^<>@\s]+@" + re.escape(config.sender.domain) + ">", header), header
        ids[address] = header
    assert len(set(ids.values())) == 3
    # Built again (a resend after a crash, later, by a new factory): the same Message-ID.
    later = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    again = MessageFactory(example, config, signer).build(ADA, "Ada", signer.recipient_key(ADA), now=later)
    assert again.message_id == ids[ADA]
    assert parse(again.data)["Message-ID"] == ids[ADA]


def test_test_send_has_its_own_message_id_and_subject(example, config, signer):
    real = build(example, config, signer)
    test = build(example, config, signer, test_send=True)
    assert test.message_id != real.message_id
    assert test.message_id.endswith(f"@{config.sender.domain}>")
    assert parse(test.data)["Subject"] == "[TEST] " + example.subject
    assert parse(real.data)["Subject"] == example.subject
    assert build(example, config, signer, test_send=True).message_id == test.message_id


# -- non-ASCII and injection ----------------------------------------------------------------------

def test_non_ascii_subject_is_encoded_and_decodes_back(example, config, signer):
    subject = "Zoë — “quotes”"
    data = build(replace(example, subject=subject), config, signer).data
    raw = raw_header(data, "Subject")
    assert raw.isascii() and b"=?utf-8?" in raw.lower()
    assert parse(data)["Subject"] == subject
    test = build(replace(example, subject=subject), config, signer, test_send=True).data
    assert parse(test)["Subject"] == "[TEST] " + subject


# Regression: _fold once split at every space and could leave a line of only white space.
def test_folded_subject_has_no_whitespace_only_line(example, config, signer):
    subject = "a" * 69 + "  " + "b" * 77
    data = build(replace(example, subject=subject), config, signer).data
    head, _ = head_and_body(data)
    field = re.search(rb"^Subject:.*?(?=\r\n(?![ \t]))", head + b"\r\n", re.S | re.M).group()
    assert not [line for line in field.split(b"\r\n") if not line.strip()], field
    assert parse(data)["Subject"] == subject


def test_long_ascii_subject_is_folded_and_decodes_back(example, config, signer):
    subject = "Read this: " + " ".join(["word"] * 25) + " https://example.com/a/long/path/to/somewhere"
    data = build(replace(example, subject=subject), config, signer).data
    head, _ = head_and_body(data)
    field = re.search(rb"^Subject:.*?(?=\r\n(?![ \t]))", head + b"\r\n", re.S | re.M).group()
    assert b"=?" not in field
    assert max(len(line) for line in field.split(b"\r\n")) <= 78
    assert parse(data)["Subject"] == subject


def test_non_ascii_name_is_encoded_in_to(example, config, signer):
    data = build(example, config, signer, name="Zoë O'Brien").data
    raw = raw_header(data, "To")
    assert raw.isascii() and b"=?utf-8?" in raw.lower()
    (address,) = parse(data)["To"].addresses
    assert address.display_name == "Zoë O'Brien"
    assert address.addr_spec == ADA


@pytest.mark.parametrize("name", ["Ada\r\nBcc: evil@example.com", "Ada\nBcc: evil@example.com",
                                  "Ada\rBcc: evil@example.com", "Ada\u2028Bcc: evil@example.com",
                                  "\r\nBcc: evil@example.com"])
def test_header_injection_through_the_name_drops_the_name(example, config, signer, name):
    data = build(example, config, signer, name=name).data
    head, _ = head_and_body(data)
    assert b"bcc" not in head.lower()
    assert b"evil" not in head
    assert raw_header(data, "To") == ADA.encode()
    msg = parse(data)
    assert msg.get_all("Bcc") is None
    assert [a.addr_spec for a in msg["To"].addresses] == [ADA]


# Regression (fixed in 09811d3): a formataddr() result of 996+ characters was encoded a second time.
@pytest.mark.parametrize("name", ["\U0001F600" * 200, "é" * 200, "Zoë O'Brien-Żółć " * 11 + "end"])
def test_long_non_ascii_name_keeps_a_valid_to(example, config, signer, name):
    data = build(example, config, signer, name=name).data
    assert [a.addr_spec for a in parse(data)["To"].addresses] == [ADA]
    raw = unfold(raw_header(data, "To")).decode("ascii")
    phrase, _, angle = raw.rpartition(" ")
    assert angle == f"<{ADA}>"
    # Decoded per RFC 2047 (whitespace between adjacent encoded words is ignored; Python's
    # address parser keeps it, so the display name is checked this way instead).
    assert str(make_header(decode_header(phrase))) == name
    assert max(len(line) for line in all_lines(data)) <= 998


ENCODED_WORD = rb"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?="


# Regression (fixed in 09811d3): Header(..., maxlinelen=76) with no header name made 76-character words.
@pytest.mark.parametrize("header", ["To", "List-Id"])
def test_encoded_words_are_at_most_75_characters(example, config, signer, header):
    name = "é" * 200
    cfg = replace(config, publication=replace(config.publication, name=name))
    data = build(example, cfg, signer, name=name).data
    words = re.findall(ENCODED_WORD, raw_header(data, header))
    assert words
    assert max(len(w) for w in words) <= 75, sorted({len(w) for w in words})


def test_subject_encoded_words_are_at_most_75_characters(example, config, signer):
    for subject in ("é" * 150, "Zoë — “quotes” " * 9, "\U0001F600" * 150):
        for test_send in (False, True):
            data = build(replace(example, subject=subject), config, signer, test_send=test_send).data
            raw = raw_header(data, "Subject")
            assert max(len(w) for w in re.findall(ENCODED_WORD, raw)) <= 75
            assert max(len(line) for line in raw.split(b"\r\n")) <= 78
            assert parse(data)["Subject"] == ("[TEST] " if test_send else "") + subject


# Regression (fixed in 09811d3): CPython's binascii.b2a_qp encodes 74 characters + a trailing
# space as a 77-octet line ('...=20', no soft break); message._qp now splits such lines.
def test_no_77_octet_line_from_a_trailing_space(example, config, signer):
    text = "Intro.\n" + "a" * 74 + " \nNext line.\n"
    data = build(replace(example, text=text), config, signer).data
    text_part, _ = parse(data).iter_parts()
    assert text_part.get_payload(decode=True) == canonical(text)
    _, body = head_and_body(data)
    long = [line for line in all_lines(body) if len(line) > 76]
    assert not long, long


# -- DKIM -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dkim_keys():
    private = subprocess.run(["/usr/bin/openssl", "genrsa", "2048"], capture_output=True, check=True,
                             timeout=60).stdout
    public_der = subprocess.run(["/usr/bin/openssl", "rsa", "-pubout", "-outform", "DER"], input=private,
                                capture_output=True, check=True, timeout=60).stdout
    return private.decode("ascii"), public_der


@pytest.fixture(scope="module")
def signed(example, config, signer, dkim_keys):
    dkim = pytest.importorskip("dkim")
    private, public_der = dkim_keys
    cfg = replace(config, dkim=replace(config.dkim, domain="watchman.example", selector="s1", private_key=private))
    data = build(example, cfg, signer).data

    def dnsfunc(name, timeout=5):
        if name == b"s1._domainkey.watchman.example.":
            return b"v=DKIM1; k=rsa; p=" + base64.b64encode(public_der)
        return None

    return data, lambda d: dkim.verify(d, dnsfunc=dnsfunc)


def test_dkim_signature_verifies_and_covers_list_unsubscribe(signed):
    data, verify = signed
    assert data.startswith(b"DKIM-Signature:")
    assert verify(data) is True
    value = unfold(raw_header(data, "DKIM-Signature")).decode("ascii")
    tags = dict(t.strip().split("=", 1) for t in value.split(";") if t.strip())
    assert tags["d"] == "watchman.example" and tags["s"] == "s1"
    signed_headers = {h.strip().lower() for h in re.sub(r"\s", "", tags["h"]).split(":")}
    assert {"list-unsubscribe", "list-unsubscribe-post", "from", "to", "subject", "list-id",
            "message-id", "date"} <= signed_headers
    for name in ONE_OF_EACH:
        raw_header(data, name)


def test_dkim_fails_when_list_unsubscribe_is_changed(signed):
    data, verify = signed
    head, body = head_and_body(data)
    m = re.search(rb"\r\nList-Unsubscribe: <https://[^>]*/", head)
    i = m.end() + 3  # a character inside the token
    tampered_head = head[:i] + (b"A" if head[i:i + 1] != b"A" else b"B") + head[i + 1:]
    assert tampered_head != head
    assert verify(tampered_head + b"\r\n\r\n" + body) is False


def test_dkim_fails_when_the_html_body_is_changed(signed):
    data, verify = signed
    # (only words that no soft line break splits: where the lines break is the encoder's choice)
    assert data.count(b"View in your") == 1
    assert verify(data.replace(b"View in your", b"View in Your")) is False
    assert verify(data) is True


DKIM_PERL = Path(__file__).with_name("dkim_verify.pl")


@pytest.fixture(scope="module")
def perl_verify(dkim_keys):
    """Mail::DKIM (Perl), independent of dkimpy: 'pass', 'fail', ... for a message."""
    present = subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e", "1"], capture_output=True).returncode == 0
    require("Perl Mail::DKIM (libmail-dkim-perl)", present)
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(dkim_keys[1]).decode("ascii")

    def verify(data: bytes) -> str:
        done = subprocess.run(["perl", str(DKIM_PERL)], input=data, capture_output=True, timeout=60,
                              env={**os.environ, "DKIM_NAME": "s1._domainkey.watchman.example", "DKIM_RECORD": record})
        assert done.returncode == 0, done.stderr
        return done.stdout.decode().split("\n")[0]
    return verify


def signed_names(data: bytes) -> list[str]:
    value = unfold(raw_header(data, "DKIM-Signature")).decode("ascii")
    tags = dict(t.strip().split("=", 1) for t in value.split(";") if t.strip())
    return [h.strip().lower() for h in re.sub(r"\s", "", tags["h"]).split(":")], tags


def test_dkim_relaxed_and_over_signed(signed, perl_verify):
    data, verify = signed
    names, tags = signed_names(data)
    assert tags["c"] == "relaxed/relaxed"
    for name in ("from", "to", "subject", "date", "message-id", "reply-to", "list-id", "list-unsubscribe",
                 "list-unsubscribe-post"):
        assert names.count(name) == 2, name  # each occurs once: named twice (RFC 6376 8.15)
    assert names.count("mime-version") == names.count("content-type") == 1
    assert verify(data) is True and perl_verify(data) == "pass"


def test_dkim_survives_a_relay_that_refolds_and_respaces_headers(signed, perl_verify):
    data, verify = signed
    head, body = head_and_body(data)
    subject = re.search(rb"\r\nSubject:[^\r]*(\r\n[ \t][^\r]*)*", head).group(0)
    words = unfold(subject[len(b"\r\nSubject:"):]).split()
    refolded = b"\r\nSubject:   " + b" \r\n\t  ".join(words) + b"  "  # other folds, more white space
    relayed = head.replace(subject, refolded).replace(b"\r\nMIME-Version: 1.0", b"\r\nMIME-Version:\t1.0 ")
    assert relayed != head
    relayed = relayed + b"\r\n\r\n" + body
    assert verify(relayed) is True and perl_verify(relayed) == "pass"


@pytest.mark.parametrize("added", [b"From: Mallory <ceo@watchman.example>", b"Subject: Urgent: wire money now",
                                   b"List-Unsubscribe: <https://evil.example/u>"], ids=["from", "subject", "list"])
@pytest.mark.parametrize("where", ["top", "bottom"])
def test_dkim_breaks_when_a_second_header_is_added(signed, perl_verify, added, where):
    data, verify = signed
    head, body = head_and_body(data)
    forged = (added + b"\r\n" + head if where == "top" else head + b"\r\n" + added) + b"\r\n\r\n" + body
    assert verify(forged) is False
    assert perl_verify(forged) == "fail"


def test_without_over_signing_an_added_subject_would_pass(example, config, signer, dkim_keys, perl_verify):
    # The control: what over-signing prevents. The same message signed the old way (each
    # header named once) still verifies with a second Subject on top.
    import dkim
    unsigned = build(example, config, signer).data
    old = dkim.sign(unsigned, b"s1", b"watchman.example", dkim_keys[0].encode(), canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[b"from", b"subject", b"to", b"list-unsubscribe"], linesep=b"\r\n")
    assert perl_verify(old + unsigned) == "pass"
    assert perl_verify(b"Subject: Urgent: wire money now\r\n" + old + unsigned) == "pass"


@pytest.mark.parametrize("secret", [b"", b"short", b"k" * 64, b"a much longer secret than one SHA-256 block " * 3])
def test_signer_hmac_is_hmac_sha256(secret):
    # The signer keeps HMAC's padded key hashes to copy per recipient: it must stay RFC 2104.
    signer = Signer(secret, "list.example")
    for data in (b"", b"recipient:ada@example.com", bytes(range(256)) * 3):
        assert signer._hmac(data) == hmac.digest(secret, data, "sha256")


QUOTE_URL = 'https://x.example/u?q="a\\b"&t={token}'


@pytest.mark.parametrize("url", [None, AMP_URL, QUOTE_URL], ids=["default", "ampersand", "quote-backslash"])
@pytest.mark.parametrize("case", ["example", *TEXTS, "html-long-line"])
def test_json_bodies_are_the_message_bodies_as_json_strings(example, config, signer, case, url):
    # Postmark and Resend get html_json/text_json spliced into their JSON by hand: each must be
    # exactly the body, with every unsubscribe URL in it, as the inside of a JSON string.
    rendered = dict(variants(example))[case]
    msg = build(rendered, with_unsubscribe_url(config, url) if url else config, signer)
    for pieces, body in ((msg.html_json, msg.html), (msg.text_json, msg.text)):
        assert all(isinstance(p, bytes) for p in pieces)
        assert json.loads(b'"' + b"".join(pieces) + b'"') == body
