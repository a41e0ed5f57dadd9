"""Warnings `check` gives about the look and the merge fields, beyond what the reader finds
in one issue file: text colours that fall under WCAG AA contrast in the template's own
colours (light and dark mode), and merge fields no subscriber has.
"""

from __future__ import annotations

import json
import re

import jinja2
from pathlib import Path
from typing import Iterable

from .colors import AA, contrast, palette
from .errors import WARNING, Problem
from .merge import parse
from .render import EMAIL_TEMPLATE, TEXT_TEMPLATE, Rendered, Renderer

THEME_TEMPLATE = "theme.j2"
CARD = "#ffffff"  # the card in light mode: email.mjml's mj-section default

# (text, background, what is written in it); names are theme.j2's, or the accent palette's
# ("link", "on_accent", "accent", "dark_link"), or "card" for the white card.
TEXT_ON = [
    ("ink", "card", "body text"),
    ("quote_ink", "card", "block quotes"),
    ("muted", "card", "dates, bylines and sources"),
    ("muted", "page", "the footer"),
    ("link", "card", "links and kickers"),
    ("on_accent", "accent", "the Read more button"),
    ("dark_ink", "dark_card", "body text in dark mode"),
    ("dark_quote_ink", "dark_card", "block quotes in dark mode"),
    ("dark_muted", "dark_card", "dates, bylines and sources in dark mode"),
    ("dark_muted", "dark_page", "the footer in dark mode"),
    ("dark_link", "dark_card", "links and kickers in dark mode"),
]
_ACCENT_DERIVED = ("accent", "link", "on_accent", "dark_link")
_HEX = re.compile(r"#[0-9a-fA-F]{6}")


def contrast_problems(renderer: Renderer) -> list[Problem]:
    """Each text colour against what it sits on, in the colours the templates really use."""
    config = renderer.config
    theme_path = Path(config.design.templates) / THEME_TEMPLATE
    try:
        theme = renderer.env.get_template(THEME_TEMPLATE).module
    except jinja2.TemplateError:
        theme = None  # templates of one's own without theme.j2: only the accent's shades are known
    colors = palette(config.design.accent_color)
    named = {"card": CARD}
    for name in ("accent", "link", "on_accent", "dark_link"):
        named[name] = getattr(colors, name)
    problems = []
    for fg, bg, what in TEXT_ON:
        a, b = _color(theme, named, fg), _color(theme, named, bg)
        if a is None or b is None:
            continue  # a theme without that colour: nothing to measure
        ratio = contrast(a, b)
        if ratio >= AA:
            continue
        # Blame the colour the author chose: the accent in newsletter.toml, else theme.j2's line.
        if fg in _ACCENT_DERIVED or bg in _ACCENT_DERIVED:
            path, line, field = config.path, _line_of(config.path, r"^\s*accent_color\s*="), "design.accent_color"
        else:
            path, line, field = theme_path, _line_of(theme_path, r"set\s+%s\s*=" % re.escape(fg)), fg
        problems.append(Problem(str(path), line, 1 if line else 0, field,
                                f"{fg} {a} on {bg} {b} ({what}) has contrast {ratio:.2f}:1; "
                                f"WCAG AA needs {AA}:1", WARNING))
    return problems


def _color(theme, named: dict[str, str], name: str) -> str | None:
    value = named.get(name, getattr(theme, name, None))
    return str(value) if value is not None and _HEX.fullmatch(str(value)) else None


def _line_of(path: Path, pattern: str) -> int:
    try:
        for number, line in enumerate(Path(path).read_text("utf-8").splitlines(), 1):
            if re.search(pattern, line):
                return number
    except OSError:
        pass
    return 0


# -- merge fields ------------------------------------------------------------------------------

OWN_FIELDS = ("name", "email")  # every subscriber has these


def merge_field_problems(rendered: Rendered, fields: Iterable[str], templates: Path, source: str) -> list[Problem]:
    """A warning for each merge field that no subscriber has (`fields`: the names they have).
    Fields in the subject or preheader are placed on their YAML line; others come from the
    templates and are placed on the template's line."""
    have = {f.lower() for f in fields} | set(OWN_FIELDS)
    issue = rendered.issue
    in_yaml = {}
    for key, text in (("subject", issue.subject), ("preheader", issue.preheader or "")):
        for part in parse(text)[0]:
            if isinstance(part, tuple):
                in_yaml.setdefault(part[0].lower(), key)
    problems, seen = [], set()
    for field, fallback in rendered.merges:
        key = field.lower()
        if key in have or key in seen:
            continue
        seen.add(key)
        gets = f"every reader gets the fallback {fallback!r}" if fallback else "every reader gets nothing there"
        message = f"merge field {field!r}: no subscriber in {source} has it; {gets}"
        if key in in_yaml:
            line, col = issue.position(in_yaml[key])
            problems.append(Problem(issue.path, line, col, in_yaml[key], message, WARNING))
        else:
            path, line = _template_line(templates, field)
            problems.append(Problem(str(path), line, 1 if line else 0, f"subscriber.{field}", message, WARNING))
    return problems


def _template_line(templates: Path, field: str) -> tuple[Path, int]:
    pattern = r"subscriber\s*(\.\s*%s\b|\[\s*['\"]%s['\"]\s*\])" % (re.escape(field), re.escape(field))
    for name in (EMAIL_TEMPLATE, TEXT_TEMPLATE):
        if line := _line_of(Path(templates) / name, pattern):
            return Path(templates) / name, line
    return Path(templates) / EMAIL_TEMPLATE, 0


def store_fields(settings) -> set[str] | None:
    """The merge fields the store's subscribed readers have; None when there is no store
    or nobody in it (then nothing can be said)."""
    from .store import open_store

    if not settings.url and not Path(settings.path).is_file():
        return None
    with open_store(settings) as store:
        names, anyone = set(), False
        for row in store.subscribers("subscribed"):
            anyone = True
            names.update(k for k, v in (json.loads(row[2]) if row[2] else {}).items() if v)
    return names if anyone else None


def csv_fields(path: Path) -> set[str]:
    """The field columns of a subscriber CSV (as `subscribers import` reads it) that anyone fills in."""
    from .recipients import CsvReport, read_csv

    names: set[str] = set()
    for recipient in read_csv(path, CsvReport()):
        names.update(k for k, v in recipient.fields.items() if v)
    return names

