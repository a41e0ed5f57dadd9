"""Issue files: YAML in, a validated ``Issue`` out, or every problem found, with file:line.

The only module that imports yaml. It composes the YAML into nodes (which keep their
positions) and checks them against ``ISSUE_SCHEMA``, a tree of small field objects in the
style of mkdocs' config options: each turns one node into a clean value or records what
was expected. Nothing stops at the first problem; every error in the file is collected.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from . import markdown, merge
from .checks import (WEB_SCHEMES, control_char_problem, is_plain_http, issue_name_problem, one_line_problem, suggest,
                     url_problem)
from .errors import ERROR, WARNING, IssueError, Problem
from .model import Commentary, Image, Issue, Lead, Link, Markdown, Quote

try:  # libyaml is ten times faster; the pure-Python loader gives the same nodes
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _Loader

SUBJECT_MAX = 150
# Far above any real issue (Gmail clips an email at about 102 KB), and far below what
# breaks: lxml (in premailer) silently drops a text of over 10 MB from the HTML.
MAX_FILE_BYTES = 1_000_000
# Block quotes, lists, emphasis and links inside each other: markdown-it silently drops
# what lies deeper than 20 levels, and the plain-text walk recurses once per level.
MARKDOWN_MAX_DEPTH = 12
MAX_PROBLEMS = 200  # per file; a megabyte of `[1, 1, 1, ...]` would otherwise be half a million lines
SUBJECT_PHONE = 60  # phones show roughly the first 40-60 characters of a subject
MARKDOWN_LINK_SCHEMES = ("http", "https", "mailto")

INVALID: Any = object()
NULL_TAG = "tag:yaml.org,2002:null"


class _Context:
    """What one file's check collects: problems and the position of every value."""

    def __init__(self, path: str):
        self.path = path
        self.problems: list[Problem] = []
        self.positions: dict[str, tuple[int, int]] = {}
        self.seen_nodes: set[int] = set()
        self.aliased: set[int] = set()  # reported once, however often it is used again

    def report(self, node_or_mark, field: str, message: str, severity: str = ERROR) -> None:
        line, col = _where(node_or_mark)
        self.problems.append(Problem(self.path, line, col, field, message, severity))

    def warn(self, node_or_mark, field: str, message: str) -> None:
        self.report(node_or_mark, field, message, WARNING)


def _where(node_or_mark) -> tuple[int, int]:
    if isinstance(node_or_mark, tuple):
        return node_or_mark
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == NULL_TAG:
        return "nothing"
    return f"{node.value!r}"


# -- fields ----------------------------------------------------------------------------------

class Field:
    """One key's rule. ``load`` returns the clean value, or INVALID after reporting why."""

    expected = "a value"

    def __init__(self, required: bool = False, hint: str = ""):
        self.required = required
        self.hint = hint

    def load(self, node: yaml.Node, ctx: _Context, field: str) -> Any:
        raise NotImplementedError

    def _scalar(self, node: yaml.Node, ctx: _Context, field: str) -> str | Any:
        if not isinstance(node, yaml.ScalarNode) or node.tag == NULL_TAG:
            ctx.report(node, field, f"expected {self.expected}, got {_describe(node)}")
            return INVALID
        return node.value


class Text(Field):
    """A string. YAML's own types are ignored: ``title: 2021`` or ``no`` is the text as written."""

    def __init__(self, required: bool = False, one_line: bool = True, max_len: int | None = None,
                 join_lines: bool = False, hint: str = ""):
        super().__init__(required, hint)
        self.one_line = one_line and not join_lines
        self.join_lines = join_lines
        self.max_len = max_len
        self.expected = "one line of text" if self.one_line else "text"

    def load(self, node, ctx, field):
        value = self._scalar(node, ctx, field)
        if value is INVALID:
            return INVALID
        value = value.strip()
        if self.join_lines:
            value = " ".join(value.split("\n"))
        problem = one_line_problem(value) if self.one_line else control_char_problem(value)
        if problem:
            ctx.report(node, field, problem)
            return INVALID
        if not value:
            ctx.report(node, field, f"must not be empty; expected {self.expected}")
            return INVALID
        if self.max_len and len(value) > self.max_len:
            ctx.report(node, field, f"is {len(value)} characters long; at most {self.max_len} are allowed")
            return INVALID
        return value


class MergeText(Text):
    """One line that may name subscriber fields: `Hi {{name|there}}` (see merge.py)."""

    def load(self, node, ctx, field):
        value = super().load(node, ctx, field)
        if value is INVALID:
            return INVALID
        _, problems = merge.parse(value)
        for problem in problems:
            ctx.report(node, field, problem)
        return INVALID if problems else value


class MarkdownText(Text):
    """Markdown source, remembered with the file line its first line is on."""

    def __init__(self, required: bool = False):
        super().__init__(required, one_line=False)
        self.expected = "Markdown text"

    def load(self, node, ctx, field):
        value = super().load(node, ctx, field)
        if value is INVALID:
            return INVALID
        # In a block scalar (| or >) the text starts on the line after the indicator.
        block = node.style in ("|", ">")
        first_line = node.start_mark.line + (2 if block else 1)
        md = Markdown(value, first_line)
        if (depth := markdown.depth(md.tokens)) > MARKDOWN_MAX_DEPTH:
            ctx.report(node, field, f"Markdown nested {depth} levels deep (block quotes, lists, emphasis, links "
                                    f"inside each other); at most {MARKDOWN_MAX_DEPTH} are allowed")
            return INVALID
        ok = True
        for i, found in enumerate(markdown.links(md.tokens)):
            where = (first_line + found.line, 1) if node.style == "|" else node
            ctx.positions[f"{field}#link{i}"] = _where(where)  # for `check --links`, by link index
            if found.kind == "image":
                ctx.report(where, field, "images are not allowed in Markdown text; use lead.image")
                ok = False
            elif problem := url_problem(found.url, MARKDOWN_LINK_SCHEMES):
                ctx.report(where, field, f"link: {problem}")
                ok = False
            elif is_plain_http(found.url):
                ctx.warn(where, field, f"plain http: link {found.url!r}; use https if the site has it")
        return md if ok else INVALID


class Url(Field):
    expected = "an absolute http(s) URL"

    def load(self, node, ctx, field):
        value = self._scalar(node, ctx, field)
        if value is INVALID:
            return INVALID
        value = value.strip()
        if problem := url_problem(value, WEB_SCHEMES):
            ctx.report(node, field, problem)
            return INVALID
        if is_plain_http(value):
            ctx.warn(node, field, f"plain http: link {value!r}; use https if the site has it")
        return value


_MONTHS = {name.lower(): n for n, name in enumerate(calendar.month_name) if name}
_MONTHS.update({name.lower(): n for n, name in enumerate(calendar.month_abbr) if name})
_MONTHS["sept"] = 9
_ISO_DATE = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})")
_MONTH_FIRST = re.compile(r"([A-Za-z]+)\.? +(\d{1,2}),? +(\d{4})")
_DAY_FIRST = re.compile(r"(\d{1,2}) +([A-Za-z]+)\.?,? +(\d{4})")


def parse_date(text: str) -> tuple[dt.date | None, str | None]:
    """(date, None) or (None, why): ISO 2021-02-09, "February 9, 2021" or "9 February 2021"."""
    text = text.strip()
    if m := _ISO_DATE.fullmatch(text):
        year, month, day = map(int, m.groups())
    elif (m := _MONTH_FIRST.fullmatch(text)) and m.group(1).lower() in _MONTHS:
        month, day, year = _MONTHS[m.group(1).lower()], int(m.group(2)), int(m.group(3))
    elif (m := _DAY_FIRST.fullmatch(text)) and m.group(2).lower() in _MONTHS:
        day, month, year = int(m.group(1)), _MONTHS[m.group(2).lower()], int(m.group(3))
    else:
        return None, f'expected a date as 2021-02-09 or "February 9, 2021", got {text!r}'
    try:
        return dt.date(year, month, day), None
    except ValueError as exc:
        return None, f"{text!r} is not a real date ({exc})"


class Date(Field):
    expected = 'a date (2021-02-09 or "February 9, 2021")'

    def load(self, node, ctx, field):
        value = self._scalar(node, ctx, field)
        if value is INVALID:
            return INVALID
        date, problem = parse_date(value)
        if problem:
            ctx.report(node, field, problem)
            return INVALID
        return date


class Int(Field):
    def __init__(self, required: bool = False, min: int = 0, max: int | None = None):
        super().__init__(required)
        self.min, self.max = min, max
        self.expected = f"a whole number from {min}" + (f" to {max}" if max is not None else " up")

    def load(self, node, ctx, field):
        value = self._scalar(node, ctx, field)
        if value is INVALID:
            return INVALID
        if not re.fullmatch(r"\+?\d{1,9}", value.strip()) or not (
            self.min <= int(value) <= (self.max if self.max is not None else int(value))
        ):
            ctx.report(node, field, f"expected {self.expected}, got {value!r}")
            return INVALID
        return int(value)


class Record(Field):
    """A mapping with known keys, built into a model class."""

    expected = "a mapping of keys to values"

    def __init__(self, build: Callable[..., Any], fields: dict[str, Field], required: bool = False,
                 hint: str = ""):
        super().__init__(required, hint)
        self.build = build
        self.fields = fields

    def load(self, node, ctx, field):
        if not isinstance(node, yaml.MappingNode):
            ctx.report(node, field, f"expected {self.expected}, got {_describe(node)}")
            return INVALID
        values: dict[str, Any] = {}
        first_seen: dict[str, yaml.Node] = {}
        ok = True
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            name = f"{field}.{key}" if field else str(key)
            if not isinstance(key, str) or key_node.tag == NULL_TAG:
                ctx.report(key_node, field or "(top level)", f"expected a key name, got {_describe(key_node)}")
                ok = False
                continue
            if key in first_seen:
                ctx.report(key_node, name, f"duplicate key; first given on line {_where(first_seen[key])[0]}")
                ok = False
                continue
            first_seen[key] = key_node
            rule = self.fields.get(key)
            if rule is None:
                ctx.report(key_node, name, f"unknown key{suggest(key, self.fields)}")
                ok = False
                continue
            if not _first_visit(value_node, ctx, name):
                ok = False
                continue
            ctx.positions[name] = _where(value_node)
            if isinstance(value_node, yaml.ScalarNode) and value_node.tag == NULL_TAG and not rule.required:
                continue  # "image:" with nothing after it means no image
            value = rule.load(value_node, ctx, name)
            if value is INVALID:
                ok = False
            else:
                values[key] = value
        for key, rule in self.fields.items():
            if rule.required and key not in first_seen:
                name = f"{field}.{key}" if field else key
                hint = f" ({rule.hint})" if rule.hint else ""
                ctx.report(node, name, f"required key is missing; expected {rule.expected}{hint}")
                ok = False
        return self.build(**values) if ok else INVALID


class ListOf(Field):
    def __init__(self, item: Field, required: bool = False):
        super().__init__(required)
        self.item = item
        self.expected = "a list"

    def load(self, node, ctx, field):
        if not isinstance(node, yaml.SequenceNode):
            ctx.report(node, field, f"expected a list (items start with '- '), got {_describe(node)}")
            return INVALID
        items, ok = [], True
        for i, item_node in enumerate(node.value):
            name = f"{field}[{i}]"
            if not _first_visit(item_node, ctx, name):
                ok = False
                continue
            ctx.positions[name] = _where(item_node)
            value = self.item.load(item_node, ctx, name)
            ok = ok and value is not INVALID
            items.append(value)
        return tuple(items) if ok else INVALID


def _first_visit(node: yaml.Node, ctx: _Context, field: str) -> bool:
    # An alias (*name) hands back a node already seen; following it could loop or blow up.
    if not isinstance(node, yaml.ScalarNode):
        if id(node) in ctx.seen_nodes:
            if id(node) not in ctx.aliased:
                ctx.aliased.add(id(node))
                ctx.report(node, field, "YAML aliases (*name) are not supported in issue files; this value "
                           "(its &anchor is here) is used again through one: write the value out")
            return False
        ctx.seen_nodes.add(id(node))
    return True



# -- the issue file's schema -------------------------------------------------------------------

def _issue(**values: Any) -> dict[str, Any]:
    return values  # finished in load_issue, which knows the path and positions


ISSUE_SCHEMA = Record(_issue, {
    "subject": MergeText(required=True, max_len=SUBJECT_MAX, hint="the email's subject line"),
    "date": Date(required=True, hint="the issue's date"),
    "number": Int(min=1),
    "preheader": MergeText(max_len=250),
    "lead": Record(Lead, {
        "source": Text(required=True, hint="the publication, e.g. U.S. News"),
        "title": Text(required=True),
        "url": Url(required=True),
        "date": Date(),
        "image": Record(Image, {
            "url": Url(required=True),
            "alt": Text(required=True, hint="describe the image for readers who cannot see it"),
            "width": Int(min=1, max=600),
        }),
        "body": MarkdownText(required=True),
        "quote": Record(Quote, {
            "text": Text(required=True, join_lines=True),
            "by": Text(),
        }),
    }, required=True, hint="the lead story: source, title, url and body"),
    "commentary": Record(Commentary, {
        "kicker": Text(max_len=40),
        "title": Text(required=True),
        "author": Text(),
        "body": MarkdownText(required=True),
    }),
    "related": ListOf(Record(Link, {
        "source": Text(required=True),
        "title": Text(required=True),
        "url": Url(required=True),
        "date": Date(),
        "summary": MarkdownText(),
    })),
})


# -- reading -------------------------------------------------------------------------------

@dataclass
class CheckResult:
    issue: Issue | None
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]


def load_issue(path: str | Path) -> CheckResult:
    """Read and check one issue file; never raises for anything the file holds."""
    path = str(path)
    ctx = _Context(path)
    if problem := issue_name_problem(Path(path).stem):
        ctx.report((0, 0), "", problem)
    root = _compose(path, ctx)
    issue = None
    if root is not None:
        values = ISSUE_SCHEMA.load(root, ctx, "")
        if values is not INVALID:
            issue = Issue(path=path, positions=ctx.positions, **values)
            _warn_about(issue, root, ctx)
    if any(p.is_error for p in ctx.problems):
        issue = None
    problems = sorted(ctx.problems)
    if len(problems) > MAX_PROBLEMS:
        rest = problems[MAX_PROBLEMS]
        problems = problems[:MAX_PROBLEMS] + [Problem(path, rest.line, rest.col, "", f"{len(problems) - MAX_PROBLEMS} "
                                                      "more problems from here on, not shown; fix these first")]
    return CheckResult(issue, problems)


def read_issue(path: str | Path) -> Issue:
    result = load_issue(path)
    if result.issue is None:
        raise IssueError(result.errors)
    return result.issue


def _compose(path: str, ctx: _Context) -> yaml.Node | None:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        ctx.report((0, 0), "", f"cannot read the file: {exc.strerror or exc}")
        return None
    if len(raw) > MAX_FILE_BYTES:
        ctx.report((1, 1), "", f"the file is {len(raw):,} bytes; an issue file is at most {MAX_FILE_BYTES:,} "
                   "(an email over about 102 KB is clipped by Gmail anyway)")
        return None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        ctx.report((1, 1), "", "the file is UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        col = exc.start - (before.rfind(b"\n") + 1) + 1
        ctx.report((line, col), "", f"the file is not UTF-8 text (byte 0x{raw[exc.start]:02X}); save it as UTF-8")
        return None
    try:
        documents = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = exc.problem or "malformed YAML"
        if exc.context:
            detail = f"{detail} ({exc.context})"
        ctx.report(mark, "", f"invalid YAML: {detail}")
        return None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow; it knows only the offset
        ctx.report(_offset_where(text, exc.position), "", f"invalid YAML: the character U+{exc.character:04X} "
                   "is not allowed in YAML (a control character or a non-character); remove it"
                   + (" (a NUL: is the file UTF-16? save it as UTF-8)" if exc.character == 0 else ""))
        return None
    except yaml.YAMLError as exc:
        ctx.report((getattr(exc, "line", 0) + 1, getattr(exc, "column", 0) + 1), "", f"invalid YAML: {exc}")
        return None
    documents = [d for d in documents if d is not None and getattr(d, "tag", None) != NULL_TAG]
    if not documents:
        ctx.report((1, 1), "", "the file is empty; an issue needs at least subject, date and lead "
                   "(`newsletter new` writes a skeleton)")
        return None
    if len(documents) > 1:
        ctx.report(documents[1], "", "the file holds more than one YAML document (---); keep one issue per file")
        return None
    return documents[0]


def _offset_where(text: str, offset: int) -> tuple[int, int]:
    """(line, column) of an offset from the YAML reader: libyaml counts UTF-8 bytes, PyYAML characters."""
    before = text.encode("utf-8")[:offset].decode("utf-8", "replace") if _Loader is not yaml.SafeLoader \
        else text[:offset]
    return before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1


def _warn_about(issue: Issue, root: yaml.Node, ctx: _Context) -> None:
    if issue.preheader is None:
        ctx.warn(root, "preheader", "missing; inboxes will show the first words of the email instead")
    elif _same_words(issue.preheader).startswith(_same_words(issue.subject)):
        ctx.warn(issue.position("preheader"), "preheader",
                 "repeats the subject; inboxes show both side by side, so say something the subject does not")
    image = issue.lead.image
    if image is not None and image.width is None:
        ctx.warn(issue.position("lead.image"), "lead.image",
                 "no width in pixels; it will be stretched to the full column: give its real width (at most 600)")
    if len(issue.subject) > SUBJECT_PHONE:
        ctx.warn(issue.position("subject"), "subject",
                 f"{len(issue.subject)} characters; phones show about the first {SUBJECT_PHONE}")


def _same_words(text: str) -> str:
    """Text compared word for word: case, punctuation and spacing ignored."""
    return " ".join(re.findall(r"\w+", text.casefold()))
