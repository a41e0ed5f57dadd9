"""Bad input, tried at scale: whatever an issue file holds, the reader (and what `check` and
`build` run after it) answers with a valid issue or with problems naming file:line, never
another exception, a hang or a blow-up of memory.

Generated inputs: YAML text dumped from random structures of the issue's shape (arbitrary
Unicode in every field, wrong types, unknown keys), that text mangled, and raw bytes (random,
NUL, invalid UTF-8, UTF-16, Latin-1). Every valid one is rendered and checked: text from the
file comes out escaped in the HTML (no live tag or attribute of its own) and whole in the
plain text, and the message built from it parses back to the same parts.
The pathological files (deep nesting, tens of MB, exponential aliases) run `newsletter check`
in a subprocess with a memory limit and a timeout.

    FUZZ_EXAMPLES_NORMAL  generated inputs tried in the normal suite
    FUZZ_EXAMPLES_SLOW    tried by the slow run (`pytest -m slow`)
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from newsletter import markdown
from newsletter.build import check_paths
from newsletter.checks import one_line_problem
from newsletter.errors import IssueError
from newsletter.message import MessageFactory
from newsletter.reader import MAX_FILE_BYTES, load_issue, read_issue
from newsletter.tokens import Signer
from newsletter.writer import write_issue

FUZZ_EXAMPLES_NORMAL = 300  # in all, over the three kinds of input below
FUZZ_EXAMPLES_SLOW = 10_000

# -- what goes into the files ------------------------------------------------------------------

# Text that has hurt parsers, templates and mail before; mixed into arbitrary Unicode.
NASTY = [
    "<script>alert(1)</script>", '"><xss-probe onclick=alert(1)>', "'><xss-probe onmouseover=x>",
    "</title><xss-probe>", "<!--", "-->", "]]>", "<![CDATA[x]]>", "<!--email-only-->", "&amp;", "&lt;b&gt;",
    "&#x3C;script&#x3E;", "{{", "}}", "{% raw %}", "{{name|there}}", "{#", "${x}", "%s", "\\", '"', "'", "`",
    "\u2028", "\u2029", "\u00a0", "\u200b", "\u202e", "\ufeff", "\ufffd", "\U0001F600", "e\u0301", "\t", "\n",
    "\r\n", "\x00", "\x1b[31m", "\x85", "*", "_", "[x](javascript:alert(1))", "<javascript:alert(1)>", "> ",
    "- ", "1. ", "#", "---", "...", "? ", ": ", "&", "*anchor", "!!python/object:os.system", "%YAML 1.1",
]
GOOD_URLS = ["https://example.com/", "https://example.com/a?b=1&c=<2>#x", "http://example.org/plain",
             "https://xn--bcher-kva.example/path", "https://example.com/%22%3E%3Cscript%3E"]
BAD_URLS = ["javascript:alert(1)", "JaVaScRiPt:alert(1)", " javascript:alert(1)", "java\tscript:alert(1)",
            "java\nscript:x", "javascript&#58;alert(1)", "&#106;avascript:alert(1)", "data:text/html,<script>x",
            "DATA:text/html;base64,PHNjcmlwdD4=", "vbscript:msgbox(1)", "VBScript:x", "\x01javascript:x",
            "javascript\x00:x", "//example.com/", "https://", "ftp://example.com/", "file:///etc/passwd"]
PROBE_TAGS = {"script", "xss-probe"}

text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(NASTY),
    st.lists(st.one_of(st.text(max_size=8), st.sampled_from(NASTY)), max_size=6).map("".join),
)
one_line = st.one_of(text, st.from_regex(r"[A-Za-z0-9 <>&\"'éß中\U0001F600]{1,40}", fullmatch=True))
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text, st.dates())
yaml_value = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(text, st.integers()), inner, max_size=4)), max_leaves=12)
date = st.one_of(st.dates(min_value=dt.date(1900, 1, 1)), st.sampled_from(
    ["2024-02-30", "February 9, 2021", "9 Sept 2021", "0000-01-01", "2021-13-01", "٢٠٢١-٠٢-٠٩"]), text)
url = st.one_of(st.sampled_from(GOOD_URLS + BAD_URLS), text)
link = st.builds(lambda label, target: f"[{label}]({target})", st.text(max_size=10), url)
markdown_text = st.lists(st.one_of(
    text, link, st.sampled_from(["**bold**", "_em_", "> quoted\n>\n> — Someone", "- a\n- b", "1. one", "`code`",
                                 "\n\n", "![img](https://example.com/i.png)", "<b>raw</b>", "[ref]\n\n[ref]: javascript:x",
                                 "*" * 60, "> " * 30 + "deep", "[" * 30 + "x" + "]" * 30])),
    max_size=8).map(" ".join)


def maybe(value_strategy):
    """A field's value: usually of the right kind, sometimes anything at all."""
    return st.one_of(value_strategy, value_strategy, value_strategy, yaml_value)


def record(required: dict, optional: dict, wild: bool):
    wrap = maybe if wild else (lambda s: s)
    extra = {"unknown": yaml_value} if wild else {}
    return st.fixed_dictionaries({k: wrap(v) for k, v in required.items()},
                                 optional={**{k: wrap(v) for k, v in optional.items()}, **extra})


# What an author could write: one line of any printable Unicode, markup and all.
NASTY_LINE = [n for n in NASTY if not one_line_problem(n)]
clean_line = st.lists(st.one_of(st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1,
                                        max_size=12), st.sampled_from(NASTY_LINE)),
                      min_size=1, max_size=5).map("".join).filter(str.strip)
good_link = st.builds(lambda label, target: f"[{label}]({target})", clean_line, st.sampled_from(GOOD_URLS))
clean_markdown = st.lists(st.one_of(clean_line, good_link, st.sampled_from(
    ["**bold**", "_em_", "> quoted\n>\n> — Someone", "\n\n- a\n- b\n\n", "\n\n1. one\n\n", "`co<de>`", "\n\n",
     "<b>raw</b>", "\n\n[ref]\n\n[ref]: https://example.com/r\n\n", "a\u2028b"])),
    min_size=1, max_size=8).map(" ".join).filter(str.strip)


def issue_doc(wild: bool):
    line, body, when, where = (one_line, markdown_text, date, url) if wild else \
        (clean_line, clean_markdown, st.dates(min_value=dt.date(1900, 1, 1)), st.sampled_from(GOOD_URLS))
    return record(
        {"subject": line if wild else clean_line.filter(lambda s: len(s.strip()) <= 150), "date": when,
         "lead": record({"source": line, "title": line, "url": where, "body": body},
                        {"date": when, "quote": record({"text": line}, {"by": line}, wild),
                         "image": record({"url": where, "alt": line}, {"width": st.integers(1, 600)}, wild)}, wild)},
        {"preheader": line, "number": st.one_of(st.integers(-5, 10**12), text) if wild else st.integers(1, 10**6),
         "commentary": record({"title": line, "body": body},
                              {"kicker": line if wild else clean_line.filter(lambda s: len(s.strip()) <= 40),
                               "author": line}, wild),
         "related": st.lists(record({"source": line, "title": line, "url": where},
                                    {"date": when, "summary": body}, wild), max_size=3)}, wild)


@st.composite
def dumped(draw) -> bytes:
    """A structure of the issue's shape as YAML, in one of the styles YAML allows."""
    doc = draw(st.one_of(issue_doc(False), issue_doc(False), issue_doc(True), yaml_value))
    style = draw(st.sampled_from([None, None, '"', "'", "|"]))
    text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()), default_style=style,
                          default_flow_style=draw(st.sampled_from([False, None, True])), sort_keys=False)
    return text.encode("utf-8")


@st.composite
def mangled(draw) -> bytes:
    """Dumped YAML, then cut, spliced and sprinkled with characters that YAML gives meaning to."""
    data = bytearray(draw(dumped()))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        choice = draw(st.integers(0, 3))
        if choice == 0:
            del data[at:at + draw(st.integers(1, 20))]
        elif choice == 1:
            data[at:at] = draw(st.sampled_from([b"&a ", b"*a", b"[", b"{", b"- ", b": ", b"\n  ", b"\t", b"\x00", b"---\n",
                                                b"!!binary ", b"<<: *a\n", b"? ", b"|\n", b"\"", b"'", b"#", b"%",
                                                b"\xef\xbb\xbf", b"\xff", b"\xc3", b"\r"]))
        elif choice == 2:
            data[at:at] = draw(st.text(max_size=6)).encode("utf-8")
        else:
            data[at:at] = bytes(data[max(0, at - 40):at])  # repeat what came before
    return bytes(data)


@st.composite
def raw_bytes(draw) -> bytes:
    """Not YAML text at all, or text in another encoding."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:
        return draw(st.sampled_from([b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf", b"\x00\x00\xfe\xff", b""])) + \
            draw(st.binary(max_size=100))
    doc = draw(dumped()).decode("utf-8")
    encoding = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252"]))
    return doc.encode(encoding, "replace")


any_file = st.one_of(dumped(), mangled(), raw_bytes())


# -- what must hold for each ---------------------------------------------------------------------

class _Tags(HTMLParser):
    """Every tag and attribute as a browser would see them."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))
        self.text += [value for name, value in attrs if name == "alt" and value]  # shown when images are off

    def handle_data(self, data):
        self.text.append(data)


def _squash(value: str) -> str:
    return " ".join(value.split())


def check_escaped(html_text: str) -> str:
    """No tag or event handler from the input is live, no link runs script. The visible text."""
    parser = _Tags()
    parser.feed(html_text)
    parser.close()
    for tag, attrs in parser.tags:
        assert tag not in PROBE_TAGS, (tag, attrs)
        for name, value in attrs:
            assert not name.startswith("on"), (tag, name, value)
            if name in ("href", "src") and value:
                scheme = re.sub(r"[\x00-\x20]", "", value).split(":", 1)[0].lower()
                assert scheme not in ("javascript", "data", "vbscript"), value
    return _squash(" ".join(parser.text))


def one_line_fields(issue):
    lead = issue.lead
    yield lead.title
    if lead.image:
        yield lead.image.alt
    if issue.commentary:
        yield issue.commentary.title
    for item in issue.related:
        yield item.title


def check_rendered(rendered, config, signer) -> None:
    visible = check_escaped(rendered.html)
    check_escaped(rendered.web_html)
    for value in one_line_fields(rendered.issue):
        # the words as written: in the page's text (tags in them are text, not markup) and the plain part
        assert _squash(value) in visible, value
        assert " ".join(markdown.words(value)) in " ".join(markdown.words(rendered.text)), value
    # The message: the stdlib parser gets back exactly the parts, and no header more or less.
    factory = MessageFactory(rendered, config, signer)
    address = "ada@example.com"
    msg = factory.build(address, "Ada", signer.recipient_key(address))
    parsed = email.message_from_bytes(msg.data, policy=email.policy.default)
    assert not parsed.defects
    assert sorted(k.lower() for k in parsed.keys()) == sorted(HEADERS + ["reply-to"] * bool(config.sender.reply_to))
    text_part, html_part = parsed.iter_parts()
    assert text_part.get_content() == re.sub(r"\r\n|\r|\n", "\r\n", msg.text)
    assert html_part.get_content() == re.sub(r"\r\n|\r|\n", "\r\n", msg.html)


HEADERS = ["to", "date", "message-id", "subject", "from", "mime-version", "list-id", "list-unsubscribe-post",
           "content-type", "list-unsubscribe"]


def check_file(data: bytes, folder: Path, config, signer) -> bool:
    """One file through the reader, `check` and `build`; True if it was a valid issue."""
    path = folder / "fuzz.yaml"
    path.write_bytes(data)
    result = load_issue(path)
    if result.issue is None:
        assert result.errors, "invalid, but no error says why"
        for problem in result.errors:
            assert problem.path == str(path) and problem.line >= 1 and problem.col >= 1, problem
            assert str(problem).startswith(f"{path}:{problem.line}:{problem.col}: "), problem
            assert problem.message.strip()
        with pytest.raises(IssueError) as raised:
            read_issue(path)
        assert raised.value.problems == result.errors
        return False
    assert read_issue(path) == result.issue
    report = check_paths([path], config, fields=({"name"}, "the test"))  # what `newsletter check` runs
    assert not report.errors, report.errors
    (rendered,) = report.rendered
    check_rendered(rendered, config, signer)
    write_issue(rendered, folder / "dist")  # what `build` does after the check
    return True


@pytest.fixture(scope="module")
def signer(config):
    return Signer(b"fuzz-secret", config.publication.list_id)


def run_property(strategy, examples: int, config, signer) -> dict:
    """Run check_file on `examples` generated files at least; counts of valid and invalid."""
    counts = {"valid": 0, "invalid": 0}
    with tempfile.TemporaryDirectory() as folder:

        @settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def prop(data):
            counts["valid" if check_file(data, Path(folder), config, signer) else "invalid"] += 1

        prop()
    assert counts["valid"] + counts["invalid"] >= examples, counts
    return counts


def test_generated_issue_shaped_yaml(config, signer):
    counts = run_property(dumped(), FUZZ_EXAMPLES_NORMAL // 2, config, signer)
    assert counts["valid"] and counts["invalid"], counts  # both sides of the reader were reached


def test_mangled_yaml(config, signer):
    run_property(mangled(), FUZZ_EXAMPLES_NORMAL // 4, config, signer)


def test_bytes_in_any_encoding(config, signer):
    run_property(raw_bytes(), FUZZ_EXAMPLES_NORMAL // 4, config, signer)


@pytest.mark.slow
def test_ten_thousand_generated_files(config, signer):
    counts = run_property(any_file, FUZZ_EXAMPLES_SLOW, config, signer)
    assert counts["valid"] and counts["invalid"], counts


# Every field reachable from the file, with markup in it: escaped in the HTML, whole in the text.
def test_markup_in_every_text_field_comes_out_escaped(write_issue, config, signer):
    probe = "x\" onerror='alert(1)' <script>alert(2)</script> <xss-probe onclick=y> &amp; ]]> -->"
    q = json.dumps(probe)  # a JSON string is a YAML one
    path = write_issue(f"""\
        subject: {q}
        date: 2024-03-01
        preheader: {q}
        lead:
          source: {q}
          title: {q}
          url: https://example.com/a?b=1&c="2"
          date: 2024-03-01
          image: {{url: "https://example.com/i.png?x=\\"y", alt: {q}, width: 300}}
          body: {q}
          quote: {{text: {q}, by: {q}}}
        commentary: {{kicker: "K <xss-probe>", title: {q}, author: {q}, body: {q}}}
        related:
          - {{source: {q}, title: {q}, url: "https://example.com/r", summary: {q}}}
        """)
    issue = read_issue(path)
    report = check_paths([path], config)
    (rendered,) = report.rendered
    check_rendered(rendered, config, signer)
    visible = check_escaped(rendered.html)
    assert visible.count(_squash(probe)) >= 10  # each field, shown as text
    assert rendered.text.count("<script>alert(2)</script>") >= 8  # the plain part shows it as written
    assert "&lt;" not in rendered.text
    assert issue.subject == probe


# -- the pathological files: their own process, memory limit, timeout -----------------------------

MEMORY_LIMIT = 1536 * 1024 * 1024  # address space for one `newsletter check`; it normally needs ~300 MB


def _billion_laughs(root: str) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]")
    return root.replace("LAUGHS", "\n".join("  " + line for line in lines))


MINIMAL = ("subject: S\ndate: 2024-03-01\npreheader: A preheader\nlead:\n  source: S\n  title: T\n"
           "  url: https://example.com/\n  body: BODY\n")
PATHOLOGICAL = {
    "deep-flow-lists": "subject: " + "[" * 20000 + "]" * 20000 + "\n",
    "deep-flow-maps": "subject: " + "{a: " * 20000 + "1" + "}" * 20000 + "\n",
    "deep-block-lists": "".join(" " * i + "-\n" for i in range(5000)) + " " * 5000 + "x\n",
    "deep-block-maps": "".join(" " * i + "a:\n" for i in range(5000)) + " " * 5000 + "b: 1\n",
    "deep-unclosed": "[" * 100000,
    "billion-laughs-at-top": _billion_laughs("LAUGHS\n").replace("  ", "", 10),
    "billion-laughs-in-a-field": MINIMAL + "related:\n  - source: S\n    title: T\n    url: https://e.com/\n"
                                 "    summary: x\n    unknown:\n" + _billion_laughs("LAUGHS").replace("\n  ", "\n      ").replace("  a:", "      a:", 1),
    "aliases-fanning-out-in-related": "subject: S\ndate: 2024-03-01\nlead: &l\n  source: S\n  title: T\n  url: "
                                      "https://e.com/\n  body: B\nrelated: [" + ", ".join(["*l"] * 100000) + "]\n",
    "merge-key-bomb": "x: &x {a: 1}\n" + "".join(f"x{i}: &x{i} {{<<: [*x{i - 1 if i else ''}, *x{i - 1 if i else ''}]}}\n"
                                                 for i in range(40)),
    "huge-subject": MINIMAL.replace("subject: S", "subject: " + "x" * 30_000_000),
    "huge-body-over-the-cap": MINIMAL.replace("BODY", "word " * 6_000_000),  # 30 MB: lxml would drop it
    "huge-key": "k" * 30_000_000 + ": 1\n",
    "huge-number": MINIMAL + "number: " + "9" * 1_000_000 + "\n",
    "many-keys": "".join(f"k{i}: {i}\n" for i in range(90_000)),
    "deep-markdown-emphasis": MINIMAL.replace("BODY", "'" + "*" * 20000 + "x" + "*" * 20000 + "'"),
    "deep-markdown-quotes": MINIMAL.replace("BODY", "|\n    " + "> " * 5000 + "lost"),
    "deep-markdown-lists": MINIMAL.replace("BODY", "|\n" + "".join("    " + "  " * i + "- a\n" for i in range(3000))),
    "nul-bytes": MINIMAL.replace("title: T", "title: T\x00\x00"),
    "utf-16-with-bom": MINIMAL,  # encoded below
    "random-megabyte": "",
}


def _bytes_of(name: str) -> bytes:
    if name == "utf-16-with-bom":
        return MINIMAL.encode("utf-16")
    if name == "random-megabyte":
        return os.urandom(900_000)
    return PATHOLOGICAL[name].encode("utf-8")


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_pathological_file_is_a_clear_error_within_bounds(tmp_path, name):
    path = tmp_path / "issue.yaml"
    path.write_bytes(_bytes_of(name))
    result = subprocess.run([sys.executable, "-m", "newsletter", "check", "--config", ROOT / "newsletter.toml",
                             path], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            preexec_fn=_limit_memory, env={k: v for k, v in os.environ.items()
                                                           if not k.startswith("NEWSLETTER_")})
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{path}:")]
    assert errors, result.stderr[-3000:]
    assert all(re.match(re.escape(str(path)) + r":\d+:\d+: ", line) for line in errors), errors
    assert len(result.stderr) < 100_000  # the error names the problem; it does not repeat the file


def test_a_file_just_under_the_cap_is_read(tmp_path, config):
    body = ("word " * 199 + "\n\n") * ((MAX_FILE_BYTES - 20_000) // 1010)
    path = tmp_path / "issue.yaml"
    path.write_text(MINIMAL.replace("BODY", "|\n" + "".join("    " + line + "\n" for line in body.splitlines())))
    assert path.stat().st_size <= MAX_FILE_BYTES
    issue = read_issue(path)
    (rendered,) = check_paths([path], config).rendered
    # Nothing lost on the way: every paragraph is in the HTML and the text.
    assert rendered.html.count("word word") >= body.count("word word") * 0.99
    assert rendered.text.count("word") == body.count("word")
    assert issue.lead.body.text.count("word") == body.count("word")
