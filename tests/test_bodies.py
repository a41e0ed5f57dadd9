"""Quoted-printable bodies against an oracle: the stdlib email parser must decode every part
of a built message (the per-recipient bytes, `Message.data`) to exactly the rendered text
with the reader's unsubscribe URL in it, and the bytes must be valid quoted-printable.

What we promise about line ends: a line end in the rendered text (LF, CRLF or a lone CR)
travels as CRLF, and the parser gives it back as CRLF. Everything else comes back as is.
"""

import email
import email.policy
import html
import re
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from newsletter.message import MessageFactory, _qp_value
from newsletter.render import PLACEHOLDERS
from newsletter.tokens import Signer

PLACEHOLDER = PLACEHOLDERS["unsubscribe_url"]
READERS = [("ada@example.com", "Ada Lovelace"), ("bob@example.org", None), ("zoe@example.net", "Zoë O'Brien")]
PART_HEAD = b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
# One encoded line, RFC 2045 section 6.7: printable ASCII but "=", =XX escapes with upper-case
# hex, spaces and tabs but not last, and at most a final "=" (a soft line break).
QP_LINE = re.compile(rb"(?:[!-<>-~]|=[0-9A-F]{2}|[ \t]+(?=[^ \t]))*=?")

PROPERTY = settings(max_examples=300, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def signer(config):
    return Signer(b"test-secret", config.publication.list_id)


def with_url(config, url):
    return replace(config, publication=replace(config.publication, unsubscribe_url=url))


def crlf(text: str) -> str:
    """The promise: every line end (LF, CRLF, lone CR) as CRLF."""
    return re.sub(r"\r\n|\r|\n", "\r\n", text)


def check_qp_part(body: bytes) -> None:
    for line in body.split(b"\r\n"):
        assert len(line) <= 76, line
        assert QP_LINE.fullmatch(line), f"not quoted-printable: {line!r}"


def check_message(data: bytes) -> list:
    """Structure of the whole message; returns its two parts, parsed by the stdlib."""
    assert max(data) < 128, "every byte 7-bit"
    assert not re.search(rb"(?<!\r)\n|\r(?!\n)", data), "bare LF or CR"
    assert not re.search(rb"(?:^|\r\n)\.", data), "a line starts with '.' (SMTP would need dot-stuffing)"
    head, _, body = data.partition(b"\r\n\r\n")
    assert max(len(line) for line in head.split(b"\r\n")) <= 998
    assert max(len(line) for line in body.split(b"\r\n")) <= 76
    msg = email.message_from_bytes(data, policy=email.policy.default)
    boundary = msg.get_boundary().encode("ascii")
    sections = body.split(b"\r\n--" + boundary)
    assert len(sections) == 4 and sections[-1] == b"--\r\n"  # preamble, text, html, end
    for section in sections[1:3]:
        check_qp_part(section.partition(b"\r\n\r\n")[2])
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert not msg.defects and not any(p.defects for p in parts)
    return parts


def check_all_readers(rendered, config, signer):
    factory = MessageFactory(rendered, config, signer)
    for address, name in READERS:
        msg = factory.build(address, name, signer.recipient_key(address))
        text_part, html_part = check_message(msg.data)
        url = msg.unsubscribe_url
        assert text_part.get_content() == crlf(merged(rendered.text, rendered, name).replace(PLACEHOLDER, url))
        assert html_part.get_content() == crlf(merged(rendered.html, rendered, name, html.escape)
                                               .replace(PLACEHOLDER, html.escape(url)))


def merged(text: str, rendered, name, escape=str) -> str:
    """The merge fields filled in as a reader sees them (the example greets by name)."""
    for number, (field, fallback) in enumerate(rendered.merges):
        value = name if field == "name" and name else fallback
        text = text.replace("{{m:%d}}" % number, escape(value))
    return text


# -- what the bodies are made of -----------------------------------------------------------------

def runs(s: str, most: int):
    return st.integers(1, most).map(lambda n: s * n)


line_ends = st.sampled_from(["\n", "\r\n", "\r"])
atoms = st.one_of(
    st.text(max_size=20),  # any Unicode (no surrogates): controls, U+2028, emoji, ...
    runs(".", 300), runs("=", 100), runs(" ", 80), runs("\t", 5), runs("\u00a0", 3),
    st.just("10\u00a0000\u00a0km"), st.sampled_from([" \n", "\t\n", " \r\n", ".\n", "=\n", "=3D", "=\r\n"]),
    line_ends, st.just(PLACEHOLDER),
    # very long lines, with and without spaces
    st.builds(lambda word, n: word * n, st.sampled_from(["x", "word ", "é", ".a", "a.", "=.", "\U0001F600 "]),
              st.integers(60, 1500)),
)
bodies = st.lists(atoms, max_size=25).map("".join)
# URL templates as the config has them: ASCII, with {token}; "." and "=" where a line may
# start, spaces and tabs where a line may end, lengths on both sides of one encoded line.
url_paths = st.lists(st.one_of(st.text(st.sampled_from("ab.=&%/?~ \t-_"), max_size=30), runs(".", 80), runs("=", 30),
                              runs("a", 80)), max_size=6).map("".join)
url_templates = st.builds(lambda path, after: f"https://x.example/{path}{{token}}{after}",
                          url_paths, st.sampled_from(["", ".", "/.", " ", "=", "?a=1&b=.."]))


@PROPERTY
@given(text=bodies, markup=bodies, url=url_templates)
def test_parts_decode_to_the_rendered_text(example, config, signer, text, markup, url):
    check_all_readers(replace(example, text=text, html=markup), with_url(config, url), signer)


@PROPERTY
@given(value=st.one_of(st.text(max_size=300), url_paths, bodies))
def test_a_spliced_value_decodes_to_itself(value):
    """The per-recipient encoder alone, over any value (the URL's header keeps it ASCII in
    the test above): it ends a line (with a soft line break if not its own), so a piece can follow."""
    encoded = _qp_value(value)
    assert encoded.endswith(b"\r\n") or not value
    assert not re.search(rb"(?<!\r)\n|\r(?!\n)", encoded) and not re.search(rb"(?:^|\n)\.", encoded)
    check_qp_part(encoded)
    part = email.message_from_bytes(PART_HEAD + encoded + b"end", policy=email.policy.default)
    assert part.get_content() == crlf(value) + "end"


# -- regressions ------------------------------------------------------------------------------

# A line of 75 or more dots came out as a lone "=" soft break then a literal "2E...": the
# cutter walked back over the dots (no line may start with ".") into the "=2E" it had made.
@pytest.mark.parametrize("n", [1, 73, 74, 75, 76, 77, 150, 151, 152, 1000])
@pytest.mark.parametrize("where", ["own-line", "after-text", "before-placeholder", "after-placeholder"])
def test_a_run_of_dots(example, config, signer, n, where):
    dots = "." * n
    text = {"own-line": f"Before\n{dots}\nAfter {PLACEHOLDER}\n",
            "after-text": f"Before {dots}\n{PLACEHOLDER}",
            "before-placeholder": f"Before\n{dots}{PLACEHOLDER}{dots}\n",
            "after-placeholder": f"{PLACEHOLDER}\n{dots}"}[where]
    check_all_readers(replace(example, text=text, html=text), config, signer)


@pytest.mark.parametrize("n", [1, 24, 25, 26, 73, 74, 75, 76, 200])
def test_a_run_of_equals_signs(example, config, signer, n):
    text = f"a\n{'=' * n}\n{'=' * n}{PLACEHOLDER}{'=' * n}.\n.{'=3D' * n}"
    check_all_readers(replace(example, text=text, html=text), config, signer)


@pytest.mark.parametrize("url", ["https://x.example/" + "." * 60 + "/{token}",
                                 "https://x.example/u/{token}/" + "." * 80,
                                 "https://x.example/" + "=" * 40 + "/{token}"])
def test_an_unsubscribe_url_of_dots_and_equals_signs(example, config, signer, url):
    check_all_readers(example, with_url(config, url), signer)


# -- no-break spaces, from the issue file to the decoded text part ----------------------------

def test_no_break_spaces_reach_the_reader_and_are_never_a_line_break(renderer, write_issue, config, signer):
    from conftest import MINIMAL
    from newsletter.reader import read_issue

    nbsp = "\u00a0"
    # "10 000 km" joined by NBSPs (typed, and as Markdown's &nbsp;) on both sides of column 78
    paragraphs = [f"Distance {'ab ' * k}10{nbsp}000{nbsp}km today." for k in range(18, 26)]
    paragraphs += [f"About {'cd ' * k}5&nbsp;000&nbsp;km by road." for k in range(18, 26)]
    body = "".join(f"    {p}\n\n" for p in paragraphs)
    title = "A trip of " + "far " * 15 + f"10{nbsp}000{nbsp}km"  # the title goes through the wrap filter
    rendered = renderer.render(read_issue(write_issue(
        MINIMAL.replace("    First paragraph.\n", body).replace("Something happened", title))))
    msg = MessageFactory(rendered, config, signer).build("ada@example.com", None,
                                                         signer.recipient_key("ada@example.com"))
    text_part, _ = check_message(msg.data)
    text = text_part.get_content()
    assert text == crlf(merged(rendered.text, rendered, None).replace(PLACEHOLDER, msg.unsubscribe_url))
    assert text.count(f"10{nbsp}000{nbsp}km") == 9 and text.count(f"5{nbsp}000{nbsp}km") == 8
    assert not re.search(f"{nbsp}\r\n|\r\n{nbsp}", text), "a line broken at a no-break space"
    # the joined words did reach the wrap column: some were carried whole to the next line
    assert re.search(f"\r\n(10|5){nbsp}000{nbsp}km", text)
