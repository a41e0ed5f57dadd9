"""Issue -> email HTML, web HTML and plain text, once per issue.

The only Jinja environment lives here. ``templates/email.mjml`` becomes MJML, mjml-python
compiles it, premailer inlines ``templates/email.css`` into the elements (every <style>
block in the head stays as written, as MJML itself does); ``templates/email.txt`` gives the
plain-text twin straight from the model. Per-recipient values stay as placeholders (``PLACEHOLDERS``,
and ``{{m:N}}`` for merge fields, see merge.py) for the message step to splice in, so
nothing here runs per recipient.

Parts of the email that make no sense on the web (the hidden preheader, "view in browser",
the unsubscribe link) sit between ``<!--email-only-->`` and ``<!--/email-only-->``; the web
page is the same HTML with those parts cut out, so premailer runs once.
"""

from __future__ import annotations

import calendar
import contextlib
import dataclasses
import datetime as dt
import importlib
import json
import logging
import os
import re
import secrets
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import mjml
from markupsafe import Markup, escape

from . import markdown
from .merge import MergeRef, MergeTable, Subscriber
from .colors import palette
from .config import Config
from .errors import WARNING, Problem, TemplateError
from .model import Issue

EMAIL_TEMPLATE = "email.mjml"
INLINE_CSS_TEMPLATE = "email.css"
TEXT_TEMPLATE = "email.txt"
TEXT_WIDTH = 78

# The default templates, shipped in the package (a symlink to templates/ in the repository).
PACKAGED_TEMPLATES = Path(__file__).resolve().parent / "templates"

# Per-recipient values, spliced in at send time. No spaces inside: premailer would
# percent-encode them in attributes.
PLACEHOLDERS = {"unsubscribe_url": "{{unsubscribe_url}}"}

GMAIL_CLIP_BYTES = 102 * 1024  # Gmail cuts the message off at about this size
SIZE_WARNING_BYTES = 90 * 1024

_MARKER = re.compile(r"<!--(/?)email-only-->")
_MERGE_PLACEHOLDER = re.compile(r"\{\{m:(\d+)\}\}")
_START_TAG = re.compile(r"<[A-Za-z][^<>]*>")
_NOT_AS_IS = re.compile(r"[^\x00-\x5b\x5d-\x7f]")  # non-ASCII and the backslash


def _ascii_attributes(mjml_source: str) -> str:
    """Non-ASCII and backslashes in attribute values as character references: mjml-python
    writes some characters of an attribute (a backslash, combining marks, ZWJ, private-use,
    unassigned) as Rust escapes like \\\\ or \\u{301}; references pass through it untouched.
    Autoescape keeps < and > out of every value, so a start tag ends at the first >."""
    return _START_TAG.sub(lambda tag: _NOT_AS_IS.sub(lambda m: f"&#{ord(m[0])};", tag[0]), mjml_source)


@dataclass(frozen=True)
class Rendered:
    issue: Issue
    subject: str  # with merge placeholders, if it has merge fields
    preheader: str
    web_url: str
    mjml: str
    html: str  # the email, with PLACEHOLDERS still in it
    web_html: str  # the page for the web archive
    text: str  # the plain-text part, with PLACEHOLDERS still in it
    merges: tuple[tuple[str, str], ...] = ()  # (field, fallback) for each {{m:N}}, by N

    @property
    def html_bytes(self) -> int:
        return len(self.html.encode("utf-8"))

    @property
    def web_subject(self) -> str:
        """The subject as the web shows it (no subscriber): each merge field's fallback."""
        return _text_with_fallbacks(self.subject, self.merges)

    @property
    def web_preheader(self) -> str:
        return _text_with_fallbacks(self.preheader, self.merges)


def long_date(value: dt.date) -> str:
    return f"{calendar.month_name[value.month]} {value.day}, {value.year}"


class Renderer:
    """Holds the Jinja environment for one newsletter; call ``render`` once per issue."""

    def __init__(self, config: Config):
        self.config = config
        self.env = jinja2.Environment(
            loader=template_loader(config.design.templates),
            bytecode_cache=_bytecode_cache(),
            # HTML-escaping is on for everything but the plain-text, CSS and YAML templates.
            autoescape=lambda name: not (name or "").endswith((".txt", ".css", ".yaml")),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self.env.filters.update(
            markdown=lambda md: Markup(markdown.to_html(md.tokens)),
            markdown_text=lambda md, width=TEXT_WIDTH: markdown.to_text(md.tokens, width),
            wrap=lambda text, width=TEXT_WIDTH, indent="": "\n".join(markdown.wrap(str(text), width, indent)),
            long_date=long_date,
            yaml=lambda value: json.dumps(str(value), ensure_ascii=False),  # a JSON string is valid YAML
        )
        plain_default = self.env.filters["default"]

        def default(value, default_value="", boolean=False):
            # `subscriber.name | default("there")`: the fallback goes with the placeholder
            if isinstance(value, MergeRef):
                return MergeRef(value.table, value.field, str(default_value))
            return plain_default(value, default_value, boolean)

        self.env.filters.update(default=default, d=default)
        self._inliner = None
        self.colors = palette(config.design.accent_color)

    def web_url(self, issue: Issue) -> str:
        return f"{self.config.publication.base_url}/{issue.stem}/"

    def context(self, issue: Issue, table: MergeTable | None = None) -> dict[str, Any]:
        cfg = self.config
        table = table or MergeTable()
        return {
            "issue": issue,
            "subscriber": Subscriber(table),
            "publication": cfg.publication,
            "sender": cfg.sender,
            "design": cfg.design,
            "colors": self.colors,
            "preheader": Markup(table.fill(issue.preheader or "", escape)),
            "web_url": self.web_url(issue),
            **PLACEHOLDERS,
        }

    def render(self, issue: Issue) -> Rendered:
        table = MergeTable()
        subject = table.fill(issue.subject, str)
        ctx = self.context(issue, table)
        text_ctx = ctx
        if subject != issue.subject:  # merge fields: the templates see placeholders
            text_ctx = {**ctx, "issue": dataclasses.replace(issue, subject=subject)}
            ctx = {**ctx, "issue": dataclasses.replace(issue, subject=Markup(table.fill(issue.subject, escape)))}
        mjml_source = self.render_template(EMAIL_TEMPLATE, ctx)
        # The template's markers, made unguessable: the same words from the issue are text
        # (escaped here, but written back as "<" inside attributes by premailer) and must stay so.
        nonce = secrets.token_hex(8)
        marked = _MARKER.sub(lambda m: f"<!--{m[1]}email-only-{nonce}-->", mjml_source)
        try:
            compiled = mjml.mjml2html(_ascii_attributes(marked), fonts={})
        except Exception as exc:  # mrml raises plain exceptions with its parser's message
            raise TemplateError(f"{EMAIL_TEMPLATE}: MJML could not be compiled: {exc}") from exc
        html = self._inline(compiled, self.render_template(INLINE_CSS_TEMPLATE, ctx))
        text = self.render_template(TEXT_TEMPLATE, text_ctx)
        for placeholder, field in table.printed.items():
            if placeholder not in html and placeholder not in text:
                raise TemplateError(f"subscriber.{field}: a filter other than default(...) was applied to it; its "
                                    "value is known only when each message is made, so nothing else can change it")
        return Rendered(
            issue=issue,
            subject=subject,
            preheader=table.fill(issue.preheader or "", str),
            web_url=ctx["web_url"],
            mjml=mjml_source,
            html=html.replace(f"<!--email-only-{nonce}-->", "").replace(f"<!--/email-only-{nonce}-->", ""),
            web_html=_with_fallbacks(re.sub(f"<!--email-only-{nonce}-->.*?<!--/email-only-{nonce}-->", "", html,
                                            flags=re.S), table.merges),
            text=text,
            merges=table.merges,
        )

    def render_template(self, name: str, ctx: dict[str, Any]) -> str:
        try:
            return self.env.get_template(name).render(ctx)
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(f"template {exc.name!r} not found in {self.config.design.templates} "
                                f"nor among the packaged ones ({PACKAGED_TEMPLATES})") from None
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{exc.filename or name}:{exc.lineno}: template syntax error: {exc.message}") from None
        except jinja2.TemplateRuntimeError as exc:  # an undefined name; a merge field tested with `if`
            raise TemplateError(f"{name}:{_template_line(exc, name)}: {exc.message}") from None

    def _inline(self, html: str, css: str) -> str:
        if self._inliner is None:
            self._inliner = _make_inliner()
        # premailer drops a lower-case doctype; MRML writes one.
        html = re.sub(r"^<!doctype html>", "", html, flags=re.I)
        # Head styles (MRML's resets, media queries, dark mode) are not for inlining.
        html = html.replace("<style", '<style data-premailer="ignore"')
        html = self._inliner(html, css).replace(' data-premailer="ignore"', "")
        return "<!DOCTYPE html>\n" + html


def template_loader(folder: Path) -> jinja2.BaseLoader:
    """The folder's own templates first, file by file, then the packaged defaults: a newsletter
    made by `newsletter init` builds with no templates of its own and overrides only what it edits."""
    folders = [Path(folder), PACKAGED_TEMPLATES]
    if Path(folder).resolve() == PACKAGED_TEMPLATES.resolve():
        folders = folders[:1]
    return jinja2.ChoiceLoader([jinja2.FileSystemLoader(str(f)) for f in folders])


def _with_fallbacks(html: str, merges: tuple[tuple[str, str], ...]) -> str:
    """The web page has no subscriber: each merge field shows its fallback."""
    if not merges:
        return html
    fallbacks = [str(escape(fallback)) for _, fallback in merges]
    return _MERGE_PLACEHOLDER.sub(lambda m: fallbacks[int(m[1])] if int(m[1]) < len(merges) else m[0], html)


def _text_with_fallbacks(text: str, merges: tuple[tuple[str, str], ...]) -> str:
    return _MERGE_PLACEHOLDER.sub(lambda m: merges[int(m[1])][1] if int(m[1]) < len(merges) else m[0], text)


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    """Compiled templates kept between runs, like .pyc files: a cold start skips Jinja's
    compiler. Keyed by each template's source, so an edited template is compiled anew."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "newsletter", f"jinja-{jinja2.__version__}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        return None  # a read-only home: compile every time
    return _BytecodeCache(folder)


class _BytecodeCache(jinja2.FileSystemBytecodeCache):
    """A cache that cannot be read or written (another user's folder, a full disk) is no
    reason to fail a command: the template is compiled instead."""

    def load_bytecode(self, bucket) -> None:
        try:
            super().load_bytecode(bucket)
        except OSError:
            pass

    def dump_bytecode(self, bucket) -> None:
        try:
            super().dump_bytecode(bucket)
        except OSError:
            pass


def _template_line(exc: BaseException, name: str) -> int:
    tb, line = exc.__traceback__, 0
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(name):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _make_inliner():
    # Imported here: premailer (cssutils, lxml, requests) is most of a cold start's cost,
    # and only commands that render pay it. premailer imports requests (40 ms) only to
    # fetch remote CSS, which allow_network=False forbids.
    import cssutils

    with _placeholder_module("requests"):
        from premailer import Premailer

    cssutils.log.setLevel(logging.CRITICAL)
    parsed_rules: dict[tuple[str, int], Any] = {}

    class StylesheetCachingPremailer(Premailer):
        # The stylesheet depends on newsletter.toml, not on the issue; premailer caches
        # its parse but re-serialises every property on each call, most of its time.
        def _parse_style_rules(self, css_body, ruleset_index):
            key = (css_body, ruleset_index)
            if key not in parsed_rules:
                parsed_rules[key] = super()._parse_style_rules(css_body, ruleset_index)
            return parsed_rules[key]

    def inline(html: str, css: str) -> str:
        return StylesheetCachingPremailer(
            html,
            css_text=[css],
            allow_network=False,  # else it fetches font CSS on every call
            strip_important=False,  # else the mobile and dark-mode !important rules break
            keep_style_tags=True,
            disable_basic_attributes=["width", "height"],  # else <img width=200> becomes 100%
            remove_classes=False,
            align_floating_images=False,
            cssutils_logging_level=logging.CRITICAL,
            disable_validation=True,
        ).transform(pretty_print=False)

    return inline


@contextlib.contextmanager
def _placeholder_module(name: str):
    """While importing something that imports `name` without needing it, give it a
    stand-in that loads the real module on first attribute use. Removed afterwards, so
    any later import of `name` is a real one."""
    if name in sys.modules:
        yield
        return
    stand_in = types.ModuleType(name)

    def load_on_use(attr: str):
        sys.modules.pop(name, None)
        return getattr(importlib.import_module(name), attr)

    stand_in.__getattr__ = load_on_use  # PEP 562
    sys.modules[name] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]


def size_problems(rendered: Rendered) -> list[Problem]:
    size = rendered.html_bytes
    if size < SIZE_WARNING_BYTES:
        return []
    over = "over" if size >= GMAIL_CLIP_BYTES else "near"
    return [Problem(rendered.issue.path, 1, 1, "", f"the email's HTML is {size / 1024:.0f} KB, {over} "
                    f"Gmail's clipping size (about 102 KB); shorten the issue", WARNING)]
