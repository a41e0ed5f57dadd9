"""The static archive: every issue's web page, an index of them and an Atom feed.

    issues/*.yaml --reader--> Issue --render--> Rendered.web_html --here--> pages --writer--> DIR/

Laid out to be served at ``[publication] base_url``::

    DIR/index.html          base_url/            every issue, newest first; the sign-up form
    DIR/<stem>/index.html   base_url/<stem>/     the issue's web page (what "view in your browser" opens)
    DIR/feed.xml            base_url/feed.xml    Atom (RFC 4287)

The templates (``archive_*.j2`` in templates/) go through render.py's one Jinja environment,
autoescaped. Output is a function of the issue files, templates and settings only (no build
time), so the same input gives the same bytes, and only files whose bytes changed are
written again.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

from .build import CheckReport, check_paths, name_problems
from .config import Config
from .errors import IssueError, OutputError, TemplateError
from .render import Rendered, Renderer
from .writer import write_if_changed

INDEX = "index.html"
FEED = "feed.xml"
INDEX_TEMPLATE = "archive_index.html.j2"
HEAD_TEMPLATE = "archive_head.html.j2"  # added at the end of each page's <head>
FOOT_TEMPLATE = "archive_foot.html.j2"  # added at the end of each page's <body>
FEED_TEMPLATE = "archive_feed.xml.j2"

# Left in a web page, a per-recipient placeholder would be a dead link or a reader's data slot.
_PLACEHOLDER = re.compile(r"\{\{[^{}]*\}\}")
_BODY = re.compile(r"<body[^>]*>(.*)</body>", re.S | re.I)
# Characters XML 1.0 does not allow, even escaped.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass
class ArchiveReport(CheckReport):
    out: Path = Path("site")
    unchanged: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Entry:
    """One issue as the index and the feed show it; text has the merge fields' fallbacks."""
    stem: str
    url: str  # the canonical page URL, base_url/<stem>/
    href: str  # relative, from the index
    number: int | None
    date: dt.date
    subject: str
    preheader: str
    updated: str  # RFC 3339, from the issue's date
    content: str  # the page's body, for the feed


def build_archive(paths: list[str | Path], config: Config, out_dir: Path, strict: bool = False) -> ArchiveReport:
    """Check every issue file; if none has an error, write the archive into out_dir."""
    checked = check_paths(paths, config)
    report = ArchiveReport(**vars(checked), out=Path(out_dir))
    report.problems.extend(name_problems(report.rendered, out_dir, reserved=(INDEX, FEED)))
    if report.failed(strict):
        raise IssueError(report.errors or report.warnings)
    if not report.files:
        return report

    renderer = Renderer(config)
    files = archive_files(renderer, report.rendered, report.notes)
    _write(files, Path(out_dir), report)
    return report


def archive_files(renderer: Renderer, rendered: list[Rendered], notes: list[str] | None = None) -> dict[str, str]:
    """Relative path -> text of every file of the archive. Pure: nothing is written."""
    cfg = renderer.config
    base = cfg.publication.base_url
    signup_url = f"{cfg.serve.public_url}/subscribe" if cfg.serve.public_url else None
    if signup_url is None and notes is not None:
        notes.append("no sign-up form: set [serve] public_url (where `newsletter serve` is reached) to add one")
    ordered = sorted(rendered, key=lambda r: (r.issue.date, r.issue.stem), reverse=True)
    ctx = {
        "publication": cfg.publication,
        "design": cfg.design,
        "colors": renderer.colors,
        "index_url": f"{base}/",
        "feed_url": f"{base}/{FEED}",
        "signup_url": signup_url,
    }
    files: dict[str, str] = {}
    entries = []
    for r in ordered:
        page = _page(renderer, r, ctx)
        files[f"{r.issue.stem}/{INDEX}"] = page
        body = _BODY.search(r.web_html)
        entries.append(Entry(
            stem=r.issue.stem,
            url=r.web_url,
            href=f"{r.issue.stem}/",
            number=r.issue.number,
            date=r.issue.date,
            subject=r.web_subject,
            preheader=r.web_preheader,
            updated=_timestamp(r.issue.date),
            content=_NOT_XML.sub("", (body[1] if body else r.web_html).strip()),
        ))
    listing = {**ctx, "issues": entries}
    files[INDEX] = renderer.render_template(INDEX_TEMPLATE, listing)
    updated = entries[0].updated if entries else _timestamp(dt.date(1970, 1, 1))
    files[FEED] = renderer.render_template(FEED_TEMPLATE, {**listing, "updated": updated})
    return files


def _page(renderer: Renderer, r: Rendered, ctx: dict) -> str:
    """The issue's web page with the archive's head (canonical URL, feed) and foot (form) added."""
    found = _PLACEHOLDER.search(r.web_html)
    if found:
        raise TemplateError(f"the web page of {r.issue.stem} still holds {found[0]}, a per-recipient value; "
                            "put what uses it between <!--email-only--> and <!--/email-only--> in the template")
    page_ctx = {**ctx, "canonical_url": r.web_url}
    head = renderer.render_template(HEAD_TEMPLATE, page_ctx)
    foot = renderer.render_template(FOOT_TEMPLATE, page_ctx)
    html = r.web_html
    head_end, body_end = html.lower().find("</head>"), html.lower().rfind("</body>")
    if head_end < 0 or body_end < head_end:
        raise TemplateError(f"the web page of {r.issue.stem} has no </head> or </body> to add the archive's parts to")
    return html[:head_end] + head + html[head_end:body_end] + foot + html[body_end:]


def _timestamp(day: dt.date) -> str:
    return f"{day.isoformat()}T00:00:00Z"


def _write(files: dict[str, str], out: Path, report: ArchiveReport) -> None:
    """Write each file whose bytes changed; never anywhere but inside `out`."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        root = out.resolve()
        # A symbolic link inside the folder could lead a write elsewhere: refuse before writing anything.
        for name in files:
            path = out / name
            if path.is_symlink() or (path.parent.exists() and not path.parent.resolve().is_relative_to(root)):
                raise OutputError(f"{path} leads outside {out} (a symbolic link); nothing was written")
        for name, text in sorted(files.items()):
            path = out / name
            path.parent.mkdir(exist_ok=True)
            (report.written if write_if_changed(path, text) else report.unchanged).append(path)
    except OSError as exc:
        raise OutputError(f"cannot write the archive to {out}: {exc.strerror or exc}") from exc
