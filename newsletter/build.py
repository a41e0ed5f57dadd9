"""The check and build commands as plain functions: paths in, problems and files out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .errors import IssueError, Problem
from .lint import contrast_problems, merge_field_problems
from .reader import load_issue
from .render import Rendered, Renderer, size_problems
from .writer import write_issue

ISSUE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class LinkOptions:
    timeout: float = 10.0
    cache: object = None  # a links.Cache; None: the one in the user's cache folder


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given; a folder stands for the issue files directly inside it."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.iterdir() if f.suffix in ISSUE_SUFFIXES and f.is_file()))
        else:
            found.append(p)
    return found


@dataclass
class CheckReport:
    files: list[Path]
    problems: list[Problem] = field(default_factory=list)
    rendered: list[Rendered] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # said, never failing: "no network", temporary redirects

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.is_error]

    def failed(self, strict: bool = False) -> bool:
        return bool(self.errors or (strict and self.warnings))


def check_paths(paths: list[str | Path], config: Config, links: LinkOptions | None = None,
                fields: tuple[set[str], str] | None = None) -> CheckReport:
    """Read, check and render every file; report every problem in every file.
    `links`: also fetch every link; `fields`: (the subscribers' merge fields, where they came from)."""
    report = CheckReport(expand_paths(paths))
    renderer = None
    for path in report.files:
        result = load_issue(path)
        report.problems.extend(result.problems)
        if result.issue is None:
            continue
        renderer = renderer or Renderer(config)
        rendered = renderer.render(result.issue)
        report.problems.extend(size_problems(rendered))
        if fields is not None:
            report.problems.extend(merge_field_problems(rendered, fields[0], config.design.templates, fields[1]))
        report.rendered.append(rendered)
    if renderer is not None:
        report.problems.extend(contrast_problems(renderer))
    if links is not None and report.rendered:
        from . import links as links_mod  # httpx: only when asked to

        found = links_mod.check_links([r.issue for r in report.rendered], links.timeout, cache=links.cache)
        report.problems.extend(found.problems)
        report.notes.extend(found.notes)
    return report


def name_problems(rendered: list[Rendered], out_dir: Path, reserved: tuple[str, ...] = ()) -> list[Problem]:
    """Two issue files that would be built into one folder (or onto a file of `reserved`)."""
    problems, stems = [], {}
    for r in rendered:
        other = stems.setdefault(r.issue.stem, Path(r.issue.path))
        if other != Path(r.issue.path):
            problems.append(Problem(r.issue.path, 0, 0, "", f"has the same name as {other}; "
                                    f"both would be built into {Path(out_dir) / r.issue.stem}"))
        elif r.issue.stem in reserved:
            problems.append(Problem(r.issue.path, 0, 0, "", f"its name would be built onto the archive's own "
                                    f"{Path(out_dir) / r.issue.stem}; rename the file"))
    return problems


def build_paths(paths: list[str | Path], config: Config, out_dir: Path, strict: bool = False) -> CheckReport:
    """Build every issue into out_dir, or, if any file has an error, build nothing."""
    report = check_paths(paths, config)
    report.problems.extend(name_problems(report.rendered, out_dir))
    if report.failed(strict):
        raise IssueError(report.errors or report.warnings)
    report.written = [write_issue(rendered, out_dir) for rendered in report.rendered]
    return report
