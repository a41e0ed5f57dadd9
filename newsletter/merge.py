"""Merge fields: a subscriber's name, address or any column of their CSV row, in the
subject, the preheader and the templates, with a fallback for when it is missing or empty.

    subject / preheader (YAML):  Hi {{name|there}}   {{ first name | friend }}   {{city}}
    templates (Jinja):           {{ subscriber.name | default("there") }}   {{ subscriber["first name"] }}

Rendering runs once per issue, so a reference renders as a short placeholder, ``{{m:N}}``
(no spaces: premailer percent-encodes them in attributes), N indexing ``Rendered.merges``,
a (field, fallback) pair; the message step splices each recipient's value in, escaped
for where it goes. Field names are matched ignoring case; `name` and `email` are the
subscriber's own.
"""

from __future__ import annotations

import re

PLACEHOLDER = "{{m:%d}}"
_REFERENCE = re.compile(r"\{\{([^{}]*)\}\}")
_FIELD = re.compile(r"\w[\w .-]*")
# Line breaks and other control characters: a value is one line, so it can never start a
# new header line (or anything else); each run of them becomes one space.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")

Part = str | tuple[str, str]  # literal text, or (field, fallback)


def clean(value: str) -> str:
    """A value as spliced: control characters and line breaks replaced by a space, white
    space collapsed, trimmed."""
    return " ".join(_UNSAFE.sub(" ", value).split())


def parse(text: str) -> tuple[list[Part], list[str]]:
    """Split a subject or preheader into literal text and references; the second item
    lists what is malformed (empty when nothing is)."""
    parts: list[Part] = []
    problems: list[str] = []
    pos = 0
    for m in _REFERENCE.finditer(text):
        parts.append(text[pos:m.start()])
        field, bar, fallback = m.group(1).partition("|")
        field, fallback = field.strip(), fallback.strip()
        if "|" in fallback:
            problems.append(f"merge field {m.group()}: one '|' only, between the field and its fallback "
                            "(e.g. {{name|there}})")
        elif not _FIELD.fullmatch(field):
            problems.append(f"merge field {m.group()}: expected a field name (letters, digits, spaces, '_', "
                            "'-', '.'), then optionally '|' and a fallback, e.g. {{name|there}}")
        parts.append((field, fallback))
        pos = m.end()
    parts.append(text[pos:])
    for literal in parts[::2]:
        if "{{" in literal:
            problems.append("merge field: '{{' is not closed by '}}' (write e.g. {{name|there}})")
        elif "}}" in literal:
            problems.append("merge field: '}}' without an opening '{{' (write e.g. {{name|there}})")
    return parts, problems


class MergeTable:
    """The (field, fallback) pairs one rendering refers to; each gets its placeholder."""

    def __init__(self):
        self.refs: dict[tuple[str, str], int] = {}
        self.printed: dict[str, str] = {}  # placeholder -> field, for those the templates printed

    def placeholder(self, field: str, fallback: str) -> str:
        return PLACEHOLDER % self.refs.setdefault((field, clean(fallback)), len(self.refs))

    def fill(self, text: str, escape) -> str:
        """A subject or preheader with its references as placeholders, the rest through `escape`."""
        parts, _ = parse(text)
        return "".join(escape(p) if isinstance(p, str) else self.placeholder(*p) for p in parts)

    @property
    def merges(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.refs)


class Subscriber:
    """`subscriber` in the templates: `subscriber.city` or `subscriber["first name"]`."""

    def __init__(self, table: MergeTable):
        self._table = table

    def __getattr__(self, field: str) -> "MergeRef":
        if field.startswith("_"):
            raise AttributeError(field)
        return MergeRef(self._table, field)

    def __getitem__(self, field: str) -> "MergeRef":
        return MergeRef(self._table, str(field))


class MergeRef:
    """One reference in a template; it prints as its placeholder."""

    def __init__(self, table: MergeTable, field: str, fallback: str = ""):
        self.table, self.field, self.fallback = table, field, fallback

    def __str__(self) -> str:
        placeholder = self.table.placeholder(self.field, self.fallback)
        self.table.printed[placeholder] = self.field
        return placeholder

    __html__ = __str__  # the placeholder needs no escaping; the value is escaped when spliced

    def __bool__(self):
        # Imported here: this module is also the reader's, which needs no Jinja.
        import jinja2

        raise jinja2.TemplateRuntimeError(
            f"subscriber.{self.field} is known only when each message is made, so it cannot be tested "
            f"here; write {{{{ subscriber.{self.field} | default(\"...\") }}}} to give a fallback")


def lookup(field: str, key: str, email: str, name: str | None, fields: dict | None) -> str:
    """A subscriber's value for `field` as written (`key`: the same, lower-cased), or ""."""
    if key == "name":
        value = name
    elif key == "email":
        value = email
    elif not fields:
        return ""
    else:
        value = fields.get(field)
        if value is None:  # another case than the CSV's header
            value = next((v for k, v in fields.items() if k.lower() == key), None)
    return clean(str(value)) if value else ""
