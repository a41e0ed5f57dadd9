"""The validated issue: plain frozen dataclasses, built only by the reader.

Markdown fields keep their source text plus the file line where that text starts, so
that anything found later (a bad link in a body) can still be reported as file:line.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True)
class Markdown:
    text: str
    line: int = 0  # file line of the text's first line; 0 when unknown

    def __str__(self) -> str:
        return self.text

    @cached_property
    def tokens(self) -> list:
        """Parsed once, then shared by the checks, the HTML and the plain text."""
        from .markdown import parse

        return parse(self.text)


@dataclass(frozen=True)
class Image:
    url: str
    alt: str
    width: int | None = None


@dataclass(frozen=True)
class Quote:
    text: str
    by: str | None = None


@dataclass(frozen=True)
class Lead:
    source: str
    title: str
    url: str
    body: Markdown
    date: dt.date | None = None
    image: Image | None = None
    quote: Quote | None = None


@dataclass(frozen=True)
class Commentary:
    title: str
    body: Markdown
    author: str | None = None
    kicker: str | None = None


@dataclass(frozen=True)
class Link:
    source: str
    title: str
    url: str
    date: dt.date | None = None
    summary: Markdown | None = None


@dataclass(frozen=True)
class Issue:
    path: str
    subject: str
    date: dt.date
    lead: Lead
    preheader: str | None = None
    number: int | None = None
    commentary: Commentary | None = None
    related: tuple[Link, ...] = ()
    # "related[0].url" -> (line, col) for every value read, for later diagnostics
    positions: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def stem(self) -> str:
        """The file name without .yaml: the issue's slug in output folders and URLs."""
        name = self.path.replace("\\", "/").rsplit("/", 1)[-1]
        return name.rsplit(".", 1)[0] if "." in name else name

    def position(self, field_path: str) -> tuple[int, int]:
        return self.positions.get(field_path, (0, 0))
