"""The command line: parse arguments, call a plain function, print, pick the exit code.

Exit codes: 0 fine; 1 the input has errors (or warnings under --strict), or a message
failed for good; 2 the command itself could not run (bad arguments, settings, templates,
output folder, a server that cannot be reached); 75 some messages were deferred and wait
for the next `send`.
Imports of the heavy parts happen inside each command, so `--help` and `new` start fast.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, IssueError, NewsletterError, SendError

EXIT_OK, EXIT_INVALID, EXIT_FAILED = 0, 1, 2
EXIT_DEFERRED = 75  # EX_TEMPFAIL: nothing failed, but some messages wait for a retry


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, got {text!r}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not 0 < value <= 300:
        raise argparse.ArgumentTypeError(f"expected a number of seconds over 0 and at most 300, got {text!r}")
    return value


def _when(text: str) -> str:
    """An ISO date or time, as the store writes them (UTC, seconds)."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date or time like 2026-12-01 or 2026-12-01T09:30, "
                                         f"got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc).isoformat(timespec="seconds")


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

    init = commands.add_parser(
        "init", help="start a newsletter: settings, an example issue and subscribers",
        description="Write DIR/newsletter.toml (commented), DIR/issues/ with an example issue and "
                    "DIR/subscribers.csv. On a terminal it asks for what the flags do not give; otherwise "
                    "--name, --sender and --postal-address are required. Existing files are never overwritten.")
    init.add_argument("dir", nargs="?", type=Path, default=Path("."), metavar="DIR",
                      help="the newsletter's folder (default: the current one; made if missing)")
    init.add_argument("--name", help="the newsletter's name")
    init.add_argument("--sender", metavar="ADDRESS", help="the From address")
    init.add_argument("--postal-address", help="your postal address, shown in every email")
    init.add_argument("--base-url", metavar="URL",
                      help="where the web archive will live (default: https://SENDER-DOMAIN/newsletter)")
    init.add_argument("--templates", action="store_true",
                      help="also copy the default templates into DIR/templates to edit (works on an existing "
                           "folder too); files there override the packaged ones one by one")
    init.set_defaults(run=run_init)

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
    check.add_argument("--links", action="store_true",
                       help="also fetch every link (broken ones are warnings; found fine, remembered for an hour)")
    check.add_argument("--link-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                       help="give up on a link after this long (default: 10)")
    check.add_argument("--list", type=Path, metavar="FILE.csv", dest="list_csv",
                       help="check merge fields against this subscriber CSV (default: the store's subscribers)")
    check.set_defaults(run=run_check)

    build = commands.add_parser("build", parents=[common], help="build email HTML, plain text and web page",
                                description="Build OUT/<name>/email.html, email.txt and index.html (the web "
                                            "page) for each issue. If any file has an error, nothing is built.")
    build.add_argument("paths", nargs="*", metavar="PATH", default=["issues"],
                       help="issue files or folders of them (default: issues/)")
    build.add_argument("--out", type=Path, default=Path("dist"), help="output folder (default: dist/)")
    build.add_argument("--strict", action="store_true", help="fail on warnings too")
    build.set_defaults(run=run_build)

    archive = commands.add_parser("archive", parents=[common], help="build the static web archive and its feed",
                                  description="Write OUT/index.html (every issue, newest first), OUT/<name>/"
                                              "index.html (each issue's web page) and OUT/feed.xml (Atom), to be "
                                              "served at [publication] base_url. Only changed files are written; "
                                              "if any issue file has an error, nothing is.")
    archive.add_argument("paths", nargs="*", metavar="PATH", default=["issues"],
                         help="issue files or folders of them (default: issues/)")
    archive.add_argument("--out", type=Path, default=Path("site"), help="output folder (default: site/)")
    archive.add_argument("--strict", action="store_true", help="fail on warnings too")
    archive.set_defaults(run=run_archive)

    send = commands.add_parser("send", parents=[common], help="send an issue to the subscribers",
                               description="Send one personalised message per subscriber through the "
                                           "configured backend, recorded in the ledger: running it again "
                                           "resumes, and nobody gets a second copy.")
    send.add_argument("issue", metavar="ISSUE", help="the issue file (or its name in issues/)")
    send.add_argument("--to", metavar="FILE.csv", type=Path, help="send to this list instead of the subscribers")
    send.add_argument("--backend", choices=("outbox", "smtp", "sendgrid", "mailgun", "postmark", "resend", "ses"),
                      help="override [send] backend")
    send.add_argument("--test", nargs="+", metavar="ADDRESS",
                      help="send only to these addresses, marked [TEST]; not recorded as the real send")
    send.add_argument("--dry-run", action="store_true", help="build every message, send nothing, record nothing")
    send.add_argument("--allow-changed", action="store_true",
                      help="resume a send although the issue changed since it began (the rest get the new version)")
    send.add_argument("--retry-failed", action="store_true",
                      help="send again to recipients whose failure was not their own (a server's or the sender's)")
    send.add_argument("--resend-uncertain", action="store_true",
                      help="send again the messages that may or may not have been delivered (see `status`)")
    send.set_defaults(run=run_send)

    serve = commands.add_parser("serve", parents=[common], help="run the readers' web service",
                                description="Serve one-click unsubscribes and the other readers' endpoints "
                                            "(see [serve] in newsletter.toml), sharing the store with `send`.")
    serve.add_argument("--host", help="override [serve] host")
    serve.add_argument("--port", type=int, help="override [serve] port")
    serve.set_defaults(run=run_serve)

    snap = commands.add_parser("snapshot", parents=[common], help="screenshot an issue: desktop, phone, dark mode",
                               description="Write desktop.png (800 px), phone.png (375 px) and dark.png (375 px, "
                                           "dark mode), each the email's full height, taken by headless Chromium "
                                           "as a sample recipient gets the issue.")
    snap.add_argument("issue", metavar="ISSUE", help="the issue file (or its name in issues/)")
    snap.add_argument("--out", type=Path, help="output folder (default: snapshots/<name>/)")
    snap.set_defaults(run=run_snapshot)

    prev = commands.add_parser("preview", parents=[common], help="show an issue in a local page that follows edits",
                               description="Serve a page with the issue at desktop and phone width, in dark mode, "
                                           "its plain text and headers; it updates itself when the issue file, "
                                           "a template or the settings change, and shows problems with file:line.")
    prev.add_argument("issue", metavar="ISSUE", help="the issue file (or its name in issues/)")
    prev.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    prev.add_argument("--port", type=int, default=8025, help="port (default: 8025; 0 picks a free one)")
    prev.add_argument("--open", action="store_true", help="open the page in the default browser")
    prev.set_defaults(run=run_preview)

    inbox = commands.add_parser(
        "inbox", parents=[common], help="read bounces, complaints and mailto unsubscribes from the bounce mailbox",
        description="Read [inbox] folder over IMAP (TLS verified; the password from NEWSLETTER_INBOX_PASSWORD): "
                    "apply each bounce (RFC 3464), complaint (RFC 5965) and unsubscribe mail once, and move it to "
                    "[inbox] processed_folder. What it cannot classify stays in the folder.")
    inbox.set_defaults(run=run_inbox)

    status = commands.add_parser("status", parents=[common], help="show how a send is going",
                                 description="Counts by state and the failures with the server's replies.")
    status.add_argument("issue", metavar="ISSUE", help="the issue file or its name")
    status.set_defaults(run=run_status)

    subs = commands.add_parser("subscribers", help="manage the subscriber list",
                               description="The subscribers in the store (see [store] path).")
    subs_commands = subs.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = subs_commands.add_parser("add", parents=[common], help="add (or re-subscribe) an address")
    add.add_argument("email")
    add.add_argument("--name")
    add.set_defaults(run=run_subscribers_add)
    remove = subs_commands.add_parser("remove", parents=[common], help="unsubscribe an address")
    remove.add_argument("email")
    remove.set_defaults(run=run_subscribers_remove)
    imp = subs_commands.add_parser("import", parents=[common], help="add everyone in a CSV (email, name, ...)")
    imp.add_argument("csv", type=Path, metavar="FILE.csv")
    imp.add_argument("--encoding", metavar="NAME",
                     help="the file's encoding when it has no byte-order mark (default: utf-8), e.g. cp1252")
    imp.set_defaults(run=run_subscribers_import)
    exp = subs_commands.add_parser("export", parents=[common], help="write every subscriber as CSV")
    exp.add_argument("--out", type=Path, help="file to write (default: standard output)")
    exp.set_defaults(run=run_subscribers_export)
    lst = subs_commands.add_parser("list", parents=[common], help="list subscribers")
    lst.add_argument("--status", choices=("subscribed", "unsubscribed", "bounced", "complained"))
    lst.set_defaults(run=run_subscribers_list)
    restore = subs_commands.add_parser(
        "restore", parents=[common], help="lift suppressions that were not the readers' fault",
        description="Lift suppressions put in place by a refusal that was not the reader's (a misconfigured "
                    "server, a mistyped sender): by address, by words of the reply, by time. Bounced subscribers "
                    "among them are subscribed again and their failed messages become pending; unsubscribes and "
                    "complaints are never undone. Give at least one filter; all given must match.")
    restore.add_argument("emails", nargs="*", metavar="EMAIL", help="these addresses")
    restore.add_argument("--reply", metavar="TEXT", help="suppressions whose reply contains TEXT, e.g. '5.1.1'")
    restore.add_argument("--since", metavar="TIME", type=_when, help="suppressed at or after TIME (ISO, UTC)")
    restore.add_argument("--until", metavar="TIME", type=_when, help="suppressed at or before TIME (ISO, UTC)")
    restore.add_argument("--dry-run", action="store_true", help="list what would be restored, change nothing")
    restore.set_defaults(run=run_subscribers_restore)

    store = commands.add_parser("store", help="the store itself: its schema, and moving it",
                                description="The store named by [store] url (PostgreSQL) or [store] path (SQLite).")
    store_commands = store.add_subparsers(dest="action", metavar="ACTION", required=True)
    info = store_commands.add_parser("info", parents=[common], help="which store, its schema and what it holds")
    info.set_defaults(run=run_store_info)
    migrate = store_commands.add_parser(
        "migrate", parents=[common], help="upgrade the store's schema to this version's",
        description="Upgrade the store to the schema this newsletter knows. A SQLite store is upgraded as it is "
                    "opened; a shared PostgreSQL store only by this command, run once from any machine (tools "
                    "older than the new schema then refuse the store: upgrade them too).")
    migrate.set_defaults(run=run_store_migrate)
    copy = store_commands.add_parser(
        "copy", help="copy a store into a new, empty one (SQLite or PostgreSQL)",
        description="Copy every subscriber, suppression, ledger row, send and event from SOURCE into TARGET, "
                    "which must be empty, in one transaction, and check the counts of every table on both "
                    "sides. Each is a SQLite file or a postgresql:// URL (its password from PGPASSWORD, "
                    "~/.pgpass or a service file). Stop sends and `serve` first: what they write during the "
                    "copy may be missed.")
    copy.add_argument("source", metavar="SOURCE", help="a SQLite file or postgresql:// URL")
    copy.add_argument("target", metavar="TARGET", help="a SQLite file or postgresql:// URL")
    copy.set_defaults(run=run_store_copy)
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


def run_init(args) -> int:
    from .config import CONFIG_FILE
    from .errors import OutputError
    from .starter import gather, init_folder

    values = None  # an existing folder: with --templates, only the templates are copied
    if (args.dir / CONFIG_FILE).exists():
        if not args.templates:  # said before asking anything
            raise OutputError(f"{args.dir / CONFIG_FILE} already exists; nothing was changed "
                              "(`newsletter init --templates` copies the default templates next to it)")
    else:
        given = {k: getattr(args, k) for k in ("name", "sender", "postal_address", "base_url")}
        try:
            values = gather(given, input if sys.stdin.isatty() else None)  # asks only on a terminal
        except ConfigError as exc:
            print("newsletter init: nothing was written:", file=sys.stderr)
            for message in exc.messages:
                print(f"  {message}", file=sys.stderr)
            return EXIT_FAILED
    report = init_folder(args.dir, values, templates=args.templates)
    for path in report.written:
        print(f"wrote {path}")
    for path in report.kept:
        print(f"kept {path} (already there)")
    if values is not None:
        where = "" if args.dir.resolve() == Path.cwd().resolve() else f"cd {args.dir} && "
        print(f"next: {where}newsletter build  (the email and web page in dist/), then "
              "`newsletter subscribers import subscribers.csv` and `newsletter send ISSUE` "
              "(the outbox backend writes .eml proofs to outbox/)")
    return EXIT_OK


def run_new(args) -> int:
    from .skeleton import new_issue

    path = new_issue(_load_config(args), args.dir, args.date or dt.date.today(), args.title)
    print(f"wrote {path}")
    return EXIT_OK


def run_check(args) -> int:
    from .build import LinkOptions, check_paths
    from .errors import StoreError
    from .lint import csv_fields, store_fields

    config = _load_config(args)
    if args.list_csv:
        fields = (csv_fields(args.list_csv), str(args.list_csv))
    else:
        try:
            have = store_fields(config.store)
        except StoreError as exc:  # a store this check cannot read is no reason to fail it
            print(f"merge fields not checked: {exc}", file=sys.stderr)
            have = None
        fields = None if have is None else (have, "the store")
    links = LinkOptions(timeout=args.link_timeout) if args.links else None
    report = check_paths(args.paths, config, links=links, fields=fields)
    if not report.files:
        print("no issue files found in " + ", ".join(map(str, args.paths)), file=sys.stderr)
        return EXIT_INVALID
    _print_problems(report.problems)
    for note in report.notes:
        print(note, file=sys.stderr)
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


def run_archive(args) -> int:
    from .archive import build_archive

    try:
        report = build_archive(args.paths, _load_config(args), args.out, strict=args.strict)
    except IssueError as exc:
        _print_problems(exc.problems)
        print(f"archive failed: nothing was written to {args.out}", file=sys.stderr)
        return EXIT_INVALID
    if not report.files:
        print("no issue files found in " + ", ".join(map(str, args.paths)), file=sys.stderr)
        return EXIT_INVALID
    _print_problems(report.warnings)
    for note in report.notes:
        print(f"note: {note}")
    for path in report.written:
        print(f"wrote {path}")
    print(f"archive of {len(report.rendered)} issue(s) in {args.out}/: {len(report.written)} file(s) written, "
          f"{len(report.unchanged)} unchanged")
    return EXIT_OK


def _issue_path(name: str) -> Path:
    path = Path(name)
    if not path.exists() and path.suffix not in (".yaml", ".yml") and (Path("issues") / f"{name}.yaml").exists():
        return Path("issues") / f"{name}.yaml"
    return path


def run_snapshot(args) -> int:
    from .snapshot import snapshot_issue

    try:
        shots = snapshot_issue(_issue_path(args.issue), _load_config(args), args.out)
    except IssueError as exc:
        _print_problems(exc.problems)
        return EXIT_INVALID
    for path in shots.values():
        print(f"wrote {path}")
    return EXIT_OK


def run_preview(args) -> int:
    from .preview import run_preview as serve_preview

    serve_preview(_issue_path(args.issue), args.config, args.host, args.port, open_browser=args.open)
    return EXIT_OK


def _print_csv_report(report, path) -> None:
    for row, value, why in report.invalid:
        print(f"{path}:{row}: skipped {value!r}: {why}", file=sys.stderr)
    if report.duplicates:
        print(f"{path}: {report.duplicates} duplicate address{'es' * (report.duplicates != 1)} counted once",
              file=sys.stderr)


def _print_reasons(reasons: dict[tuple[str, str], int], shown: int = 5) -> None:
    """Why this run failed or left uncertain what it did, the commonest answers first."""
    ranked = sorted(reasons.items(), key=lambda item: -item[1])
    for (state, reply), n in ranked[:shown]:
        print(f"{state} {n}: {reply[:300]}", file=sys.stderr)
    if len(ranked) > shown:
        print(f"... and {len(ranked) - shown} other answer(s): see `newsletter status`", file=sys.stderr)


def run_send(args) -> int:
    from .progress import ProgressLine
    from .sender import send_issue

    try:
        summary = send_issue(_issue_path(args.issue), _load_config(args), backend_name=args.backend, to_csv=args.to,
                             test_addresses=args.test, dry_run=args.dry_run, allow_changed=args.allow_changed,
                             retry_failed=args.retry_failed, resend_uncertain=args.resend_uncertain,
                             progress=ProgressLine())
    except SendError as exc:
        if exc.counts is None:
            raise
        c = exc.counts  # the send stopped part way: say what it left, not only why
        print(f"newsletter: {exc}", file=sys.stderr)
        print(f"stopped: the ledger holds {c['sent']} sent, {c['pending']} pending, {c['deferred']} deferred, "
              f"{c['failed']} failed, {c['uncertain']} uncertain; nobody was marked failed by this stop. "
              "Run send again once it is fixed: it resumes where it stopped", file=sys.stderr)
        return EXIT_FAILED
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if summary.csv:
        _print_csv_report(summary.csv, args.to)
    if summary.found_in_flight:
        print(f"{len(summary.found_in_flight)} message(s) were in flight when an earlier send stopped and may have "
              "been delivered; they are marked uncertain, not sent again (see `status`; --resend-uncertain "
              "sends them): " + ", ".join(summary.found_in_flight[:20])
              + (" ..." if len(summary.found_in_flight) > 20 else ""), file=sys.stderr)
    if summary.requeued:
        print(f"{summary.requeued} message(s) put back to send again")
    run = summary.this_run
    if args.dry_run:
        size = summary.bytes / max(summary.built, 1) / 1024
        print(f"dry run: built {summary.built} message(s), {size:.1f} KB each on average; "
              f"{run['skipped']} skipped; nothing sent")
        return EXIT_OK
    print(f"{'test send' if args.test else summary.issue}: sent {run['sent']}, deferred {run['deferred']}, "
          f"failed {run['failed']}, uncertain {run['uncertain']}, skipped {run['skipped']}")
    if summary.counts:
        c = summary.counts
        which = "proofs in the outbox" if summary.destination == "outbox" else "deliveries"
        print(f"ledger ({which}): {c['sent']} sent, {c['pending']} pending, {c['deferred']} deferred, "
              f"{c['failed']} failed, {c['uncertain']} uncertain, {c['skipped']} skipped")
    _print_reasons(summary.reasons)
    if summary.elsewhere:
        print(f"{summary.elsewhere} still being sent by another `newsletter send` of this issue, running now")
    if summary.stopped:
        print(f"stopped: {summary.stopped}", file=sys.stderr)
    if summary.counts and not sum(summary.counts.values()):
        print("nobody to send to: add subscribers with `newsletter subscribers import FILE.csv`, "
              "or pass --to FILE.csv", file=sys.stderr)
    if summary.backend == "outbox":
        print(f"messages are in {summary.backend_detail.removeprefix('outbox ')} (proofs: they do not count as "
              "delivered; send with --backend smtp or an API to deliver)")
    if summary.refused:
        return EXIT_FAILED
    if run["failed"] or (summary.counts and summary.counts["uncertain"]):
        return EXIT_INVALID  # failed for good, or waiting for a decision on uncertain messages
    # What waits for the next run, by the ledger: a message deferred and then sent in this run does not.
    if (summary.counts and summary.counts["deferred"] + summary.counts["pending"] > summary.elsewhere) or \
            (not summary.counts and run["deferred"]):
        return EXIT_DEFERRED
    return EXIT_OK


def run_serve(args) -> int:
    from .web.server import run

    run(_load_config(args), args.host, args.port)
    return EXIT_OK


def run_inbox(args) -> int:
    from .inbox import read_inbox

    summary = read_inbox(_load_config(args))
    c = summary.counts
    print(f"{summary.folder}: {c['hard_bounce']} hard bounce(s), {c['soft_bounce']} soft bounce(s), "
          f"{c['complaint']} complaint(s), {c['unsubscribe']} unsubscribe(s) applied; "
          f"{len(summary.not_readers)} bounce(s) not the reader's fault; {summary.replays} applied before; "
          f"{summary.filed} mail(s) moved to {summary.processed_folder}; "
          f"{len(summary.unknown)} left in {summary.folder}")
    for words in summary.not_readers:
        print(f"not the reader's fault, nobody suppressed (check the sending settings): {words}", file=sys.stderr)
    for why in summary.unknown:
        print(f"left in {summary.folder}: {why}", file=sys.stderr)
    return EXIT_OK


def run_status(args) -> int:
    from .sender import status_of

    status = status_of(_load_config(args), args.issue)
    if not status.destinations:
        print(f"{args.issue}: not sent yet")
        return EXIT_OK
    names = {"mail": "delivered by mail", "outbox": "proofs in the outbox (never counted as delivered)"}
    for dest in sorted(status.destinations, key=lambda d: d != "mail"):
        counts = status.destinations[dest]
        print(f"{args.issue}: {names.get(dest, dest)}: {sum(counts.values())} recipient(s)")
        for state, n in counts.items():
            print(f"  {state:<9} {n}")
        if dest == "mail" and status.sent_via:
            print("  sent via " + ", ".join(f"{via} {n}" for via, n in sorted(status.sent_via.items())))
    for email, updated in status.in_flight:
        print(f"in flight ({updated}): {email}; if no send is running, the next one marks it uncertain")
    for email, state, reply, attempts, fault in status.problems:
        whose = f", {fault}'s fault" if fault and state != "uncertain" else ""
        print(f"{state}: {email} ({attempts} attempt{'s' * (attempts != 1)}{whose}): {reply}")
    mail = status.destinations.get("mail", {})
    if mail.get("uncertain"):
        print(f"{mail['uncertain']} message(s) may or may not have been delivered: "
              "`newsletter send ISSUE --resend-uncertain` sends them again")
    return EXIT_INVALID if mail.get("failed") or mail.get("uncertain") else EXIT_OK


def _store(args):
    from .store import open_store

    return open_store(_load_config(args).store)


def run_subscribers_add(args) -> int:
    from .recipients import Recipient, address_problem, clean_name, normalize

    if problem := address_problem(args.email.strip()):
        print(f"newsletter: {args.email!r}: {problem}", file=sys.stderr)
        return EXIT_INVALID
    name = clean_name(args.name)
    if args.name is not None and name is None:
        print("newsletter: --name: expected one line of at most 200 characters, no control characters",
              file=sys.stderr)
        return EXIT_INVALID
    with _store(args) as store:
        result = store.add(Recipient(normalize(args.email), name), "cli add", resubscribe=True)
    print(f"{normalize(args.email)}: {result}")
    return EXIT_INVALID if result == "suppressed" else EXIT_OK


def run_subscribers_remove(args) -> int:
    from .recipients import address_problem, normalize

    if problem := address_problem(args.email.strip()):
        print(f"newsletter: {args.email!r}: {problem}", file=sys.stderr)
        return EXIT_INVALID
    with _store(args) as store:
        changed = store.set_status(normalize(args.email), "unsubscribed", "cli remove")
    print(f"{normalize(args.email)}: {'unsubscribed' if changed else 'not a current subscriber'}")
    return EXIT_OK if changed else EXIT_INVALID


def run_subscribers_import(args) -> int:
    from .recipients import CsvReport, read_csv

    report = CsvReport()
    results: dict[str, int] = {}
    suppressions = 0
    with _store(args) as store, store.transaction():
        for recipient in read_csv(args.csv, report, args.encoding):
            if recipient.status:  # else the row is a suppression only
                result = store.add(recipient, f"import {args.csv.name}")
                results[result] = results.get(result, 0) + 1
            if recipient.suppressed:  # after adding: the store adds no suppressed address
                store.suppress(recipient.email, recipient.suppressed, recipient.suppressed_at)
                suppressions += 1
    _print_csv_report(report, args.csv)
    kept = {"unsubscribed": "left unsubscribed", "bounced": "left bounced", "complained": "left as complained",
            "suppressed": "suppressed, not added"}
    parts = [f"{results.get('added', 0)} added", f"{results.get('updated', 0)} already subscribed"]
    parts += [f"{n} {kept[k]}" for k, n in sorted(results.items()) if k in kept]
    if suppressions:
        parts.append(f"{suppressions} suppression{'s' * (suppressions != 1)} kept")
    parts.append(f"{len(report.invalid)} invalid")
    print(f"{args.csv}: {report.read} row(s): " + ", ".join(parts))
    return EXIT_INVALID if report.invalid else EXIT_OK


def run_subscribers_export(args) -> int:
    from .errors import OutputError
    from .recipients import write_csv

    try:
        out = open(args.out, "w", newline="", encoding="utf-8") if args.out else sys.stdout
    except OSError as exc:
        raise OutputError(f"{args.out}: cannot write it: {exc.strerror or exc}") from exc
    try:
        with _store(args) as store:
            write_csv(out, store)
    finally:
        if args.out:
            out.close()
    return EXIT_OK


def run_subscribers_list(args) -> int:
    with _store(args) as store:
        n = 0
        for email, name, _fields, status, changed_at, how in store.subscribers(args.status):
            n += 1
            print(f"{email:<40} {status:<12} {name or '':<24} {changed_at} {how}")
    print(f"{n} subscriber(s)", file=sys.stderr)
    return EXIT_OK


def run_subscribers_restore(args) -> int:
    from .recipients import normalize

    with _store(args) as store:
        found = store.restore([normalize(e) for e in args.emails], args.reply, args.since, args.until,
                              apply=not args.dry_run)
    for email, reason, when in found:
        print(f"{email:<40} suppressed {when}: {reason}")
    verb = "would be restored" if args.dry_run else "restored"
    print(f"{len(found)} address(es) {verb}", file=sys.stderr)
    return EXIT_OK if found else EXIT_INVALID


def run_store_info(args) -> int:
    from .store import SCHEMA_VERSION, table_counts

    with _store(args) as store:
        print(f"{store.kind} store: {store.where}")
        print(f"schema {store.schema_version()} (this newsletter: {SCHEMA_VERSION})")
        for table, n in table_counts(store).items():
            print(f"  {table:<12} {n}")
    return EXIT_OK


def run_store_migrate(args) -> int:
    from .store import open_store

    with open_store(_load_config(args).store, migrating=True) as store:
        before, now = store.migrate()
        where = store.where
    print(f"{where}: schema {before} upgraded to {now}" if before is not None else
          f"{where}: schema {now}, already this newsletter's")
    return EXIT_OK


def run_store_copy(args) -> int:
    from .errors import StoreError
    from .store import copy_store, is_postgres_url, open_at

    if not is_postgres_url(args.target) and Path(args.target).exists() and Path(args.target).stat().st_size:
        raise StoreError(f"{args.target} already exists: copy into a new file")
    if not is_postgres_url(args.source) and not Path(args.source).is_file():
        raise StoreError(f"{args.source}: no such store")
    with open_at(args.source) as source, open_at(args.target) as target:
        counts = copy_store(source, target)
        print(f"copied {source.where} to {target.where}, counts checked:")
    for table, n in counts.items():
        print(f"  {table:<12} {n}")
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
