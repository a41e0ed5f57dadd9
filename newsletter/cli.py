"""The command line: parse arguments, call a plain function, print, pick the exit code.

Exit codes: 0 fine; 1 the input has errors (or warnings under --strict); 2 the command
itself could not run (bad arguments, settings, templates, output folder).
Imports of the heavy parts happen inside each command, so `--help` and `new` start fast.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, IssueError, NewsletterError

EXIT_OK, EXIT_INVALID, EXIT_FAILED = 0, 1, 2


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, got {text!r}") from None


def make_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", type=Path,
                        help="settings file (default: newsletter.toml in the current folder)")

    parser = argparse.ArgumentParser(
        prog="newsletter",
        description="Turn YAML issue files into responsive HTML email and plain text.",
        epilog="Run 'newsletter COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    new = commands.add_parser("new", parents=[common], help="write a new issue file from a commented skeleton",
                              description="Write issues/DATE-TITLE.yaml from a commented skeleton.")
    new.add_argument("--date", type=_date, default=None, help="the issue's date, YYYY-MM-DD (default: today)")
    new.add_argument("--title", help="the lead story's title (also names the file)")
    new.add_argument("--dir", type=Path, default=Path("issues"), help="where to write it (default: issues/)")
    new.set_defaults(run=run_new)

    check = commands.add_parser("check", parents=[common], help="validate issue files",
                                description="Validate issue files and report every problem as "
                                            "PATH:LINE:COL: FIELD: MESSAGE. Exit 1 if any has an error.")
    check.add_argument("paths", nargs="*", metavar="PATH", default=["issues"],
                       help="issue files or folders of them (default: issues/)")
    check.add_argument("--strict", action="store_true", help="fail on warnings too")
    check.set_defaults(run=run_check)

    build = commands.add_parser("build", parents=[common], help="build email HTML, plain text and web page",
                                description="Build OUT/<name>/email.html, email.txt and index.html (the web "
                                            "page) for each issue. If any file has an error, nothing is built.")
    build.add_argument("paths", nargs="*", metavar="PATH", default=["issues"],
                       help="issue files or folders of them (default: issues/)")
    build.add_argument("--out", type=Path, default=Path("dist"), help="output folder (default: dist/)")
    build.add_argument("--strict", action="store_true", help="fail on warnings too")
    build.set_defaults(run=run_build)
    return parser


def _load_config(args):
    from .config import load_config

    return load_config(args.config)


def _print_problems(problems) -> None:
    for problem in problems:
        print(problem, file=sys.stderr)


def _summary(report) -> str:
    e, w, n = len(report.errors), len(report.warnings), len(report.files)
    return (f"{e} error{'s' * (e != 1)}, {w} warning{'s' * (w != 1)} "
            f"in {n} file{'s' * (n != 1)}")


def run_new(args) -> int:
    from .skeleton import new_issue

    path = new_issue(_load_config(args), args.dir, args.date or dt.date.today(), args.title)
    print(f"wrote {path}")
    return EXIT_OK


def run_check(args) -> int:
    from .build import check_paths

    report = check_paths(args.paths, _load_config(args))
    if not report.files:
        print("no issue files found in " + ", ".join(map(str, args.paths)), file=sys.stderr)
        return EXIT_INVALID
    _print_problems(report.problems)
    failed = report.failed(args.strict)
    print(("check failed: " if failed else "ok: ") + _summary(report), file=sys.stderr if failed else sys.stdout)
    return EXIT_INVALID if failed else EXIT_OK


def run_build(args) -> int:
    from .build import build_paths

    try:
        report = build_paths(args.paths, _load_config(args), args.out, strict=args.strict)
    except IssueError as exc:
        _print_problems(exc.problems)
        print(f"build failed: nothing was written to {args.out}", file=sys.stderr)
        return EXIT_INVALID
    if not report.files:
        print("no issue files found in " + ", ".join(map(str, args.paths)), file=sys.stderr)
        return EXIT_INVALID
    _print_problems(report.warnings)
    for folder in report.written:
        print(f"built {folder}/ (email.html, email.txt, index.html)")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print("newsletter: settings are not valid:", file=sys.stderr)
        for message in exc.messages:
            print(f"  {message}", file=sys.stderr)
        return EXIT_FAILED
    except NewsletterError as exc:
        print(f"newsletter: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("newsletter: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
