"""Kill -9 a send at random moments, many times in a row, and check that nothing was lost or doubled.

Each round starts a real ``python -m newsletter send ISSUE`` process (SMTP, plain, to a
counting aiosmtpd server in ANOTHER process on 127.0.0.1), waits a random delay (so that
kills land during start-up, while the ledger is being filled, and mid-send) and kills it
with SIGKILL. After every kill the ledger is read: the rows left in flight (``sending``)
must be at most one per SMTP connection. The next run reports them as ``uncertain`` and
never resends them by itself. Once an issue has gone to everyone, the rounds go on with a
copy of it under a new name (a new send), so every kill hits a send in progress.

At the end one last run (not killed) finishes the current issue, and the server's count,
made per recipient and Message-ID as each message arrived, is compared with the ledger:

- every recipient of every issue got exactly one message, except the rows the ledger calls
  uncertain, each of which got 0 or 1;
- duplicates (a recipient with two messages of one issue): must be 0;
- rows uncertain after a kill: never more than the SMTP connections (one message each in flight).

``--backend resend`` runs the same rounds against the Resend stand-in (tests/api_server.py,
in another process), whose Idempotency-Key makes a resend harmless: every run after a
kill passes ``--resend-uncertain``, and then every recipient must have exactly one message.

    .venv/bin/python bench/kills.py --kills 50                  # 3,000 recipients, 4 connections
    .venv/bin/python bench/kills.py --kills 20 --backend resend
    .venv/bin/python bench/kills.py --kills 50 --store postgresql   # the ledger in PostgreSQL

Exit status 0 when every check held, 1 when one failed. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "issues" / "2021-08-13-china-taliban.yaml"
SECRET = "kills-bench-secret-not-for-production"
API_BATCH = 10  # Resend: messages a request (at 20 requests a second, so that a send lasts long enough to kill)


# -- the counting servers (each runs in a process of its own) --------------------------------------

def serve_smtp(port: int, log: Path) -> None:
    """aiosmtpd on 127.0.0.1:port; for each message it takes, one line "recipient<TAB>Message-ID"
    is written to `log` before the 250 goes back."""
    from aiosmtpd.controller import Controller

    out = open(log, "a", encoding="utf-8", buffering=1)

    class Counting:
        async def handle_DATA(self, server, session, envelope):
            found = re.search(rb"^Message-ID: *(<[^>\r\n]+>)", envelope.original_content, re.M | re.I)
            mid = found.group(1).decode() if found else "?"
            for rcpt in envelope.rcpt_tos:
                out.write(f"{rcpt}\t{mid}\n")
            out.flush()
            return "250 2.0.0 Ok: queued"

    controller = Controller(Counting(), hostname="127.0.0.1", port=port, data_size_limit=10_000_000)
    controller.start()
    _wait_for_term()
    controller.stop()


def serve_api(port_file: Path, log: Path) -> None:
    """The provider stand-in; on SIGTERM it writes what each recipient received to `log`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from api_server import ApiServer

    with ApiServer() as server:
        server.httpd.handle_error = lambda request, address: None  # a killed client's reset is no news
        port_file.write_text(str(server.port))
        _wait_for_term()
        server.wait_idle()
        with open(log, "w", encoding="utf-8") as out:
            for r in server.received:
                mid = r.headers.get("x-newsletter-message-id") or r.headers.get("message-id") or r.subject
                out.write(f"{r.address}\t<{mid.strip('<>')}>\n")


def _wait_for_term() -> None:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.05)


# -- the rounds ----------------------------------------------------------------------------------

@dataclass
class Figures:
    kills: int = 0
    recipients: int = 0
    issues: int = 0
    delivered_once: int = 0
    uncertain: int = 0
    uncertain_delivered: int = 0  # of the uncertain rows, those whose message did arrive
    duplicates: int = 0
    lost: int = 0
    most_in_flight: int = 0
    where: Counter = field(default_factory=Counter)  # where the kills landed
    problems: list[str] = field(default_factory=list)

    def table(self) -> str:
        where = ", ".join(f"{k} {n}" for k, n in sorted(self.where.items()))
        return "\n".join([
            f"kills                         {self.kills} ({where})",
            f"recipients                    {self.recipients} a send, {self.issues} send(s)",
            f"delivered exactly once        {self.delivered_once}",
            f"uncertain (0 or 1 each)       {self.uncertain} ({self.uncertain_delivered} of them did arrive)",
            f"most in flight after a kill   {self.most_in_flight}",
            f"duplicates                    {self.duplicates}",
            f"lost                          {self.lost}",
        ])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the server on port {port} did not start")


def settings(folder: Path, backend: str, port: int, connections: int, store_url: str | None = None
             ) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update({
        "NEWSLETTER_SECRET": SECRET,
        "NEWSLETTER_DESIGN_TEMPLATES": str(ROOT / "templates"),
        "NEWSLETTER_STORE_PATH": str(folder / "store.sqlite3"),
        "NEWSLETTER_SEND_BACKEND": backend,
        "NEWSLETTER_SEND_RETRY_DELAY": "0.05",
        "NEWSLETTER_SEND_MAX_WAIT": "10",
    })
    if store_url:
        env["NEWSLETTER_STORE_URL"] = store_url
    if backend == "smtp":
        env.update({"NEWSLETTER_SMTP_HOST": "127.0.0.1", "NEWSLETTER_SMTP_PORT": str(port),
                    "NEWSLETTER_SMTP_SECURITY": "none",
                    "NEWSLETTER_SMTP_CONNECTIONS": str(connections), "NEWSLETTER_SMTP_TIMEOUT": "10"})
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from api_server import KEYS
        env.update({"NEWSLETTER_RESEND_BASE_URL": f"http://127.0.0.1:{port}",
                    "NEWSLETTER_RESEND_API_KEY": KEYS["resend"], "NEWSLETTER_RESEND_REQUESTS_PER_SECOND": "20",
                    "NEWSLETTER_RESEND_REQUESTS_IN_FLIGHT": str(connections),
                    "NEWSLETTER_RESEND_BATCH_SIZE": str(API_BATCH), "NEWSLETTER_RESEND_RETRY_DELAY": "0.05"})
    return env


def open_ledger(store: Path | str):
    """The store: the SQLite file, or a postgresql:// URL (--store postgresql)."""
    sys.path.insert(0, str(ROOT))
    from newsletter.store import open_at
    return open_at(store)


def subscribe(store: Path | str, n: int) -> list[str]:
    from newsletter.recipients import Recipient

    everyone = [f"reader{i}@example.com" for i in range(n)]
    with open_ledger(store) as s, s.transaction():
        for address in everyone:
            s.add(Recipient(address, f"Reader {address.split('@')[0]}"), "kills bench")
    return everyone


def ledger(store: Path | str, issue: str) -> dict[str, str]:
    with open_ledger(store) as s:
        return dict(s.db.execute("SELECT email, state FROM deliveries WHERE issue = ? AND destination = 'mail'",
                                 (issue,)))


def run(kills: int = 50, recipients: int = 3000, connections: int = 4, backend: str = "smtp",
        max_delay: float = 2.5, seed: int | None = None, folder: Path | None = None,
        say=lambda text: None, store_url: str | None = None) -> Figures:
    """The rounds; returns the figures (problems listed in figures.problems)."""
    rng = random.Random(seed)
    own = folder is None
    folder = Path(tempfile.mkdtemp(prefix="kills-")) if own else folder
    log = folder / "received.log"
    log.write_text("")
    store = store_url or folder / "store.sqlite3"
    figures = Figures(recipients=recipients)
    server, port = start_server(backend, folder, log)
    try:
        env = settings(folder, backend, port, connections, store_url)
        everyone = subscribe(store, recipients)
        issues = [new_issue(folder, 1)]
        uncertain_ever: set[tuple[str, str]] = set()
        round_ = 0
        while figures.kills < kills and round_ < 3 * kills:  # a run may end before its kill: not counted
            round_ += 1
            issue = issues[-1]
            before = ledger(store, issue.stem)
            if before and all(s in ("sent", "uncertain") for s in before.values()) and len(before) == recipients:
                issue = new_issue(folder, len(issues) + 1)  # that send is over: kill the next one
                issues.append(issue)
                before = {}
            args = ["send", str(issue)] + (["--resend-uncertain"] if backend == "resend" else [])
            process = subprocess.Popen([sys.executable, "-m", "newsletter", *args], cwd=ROOT, env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            delay = rng.uniform(0.0, max_delay)
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
            _, err = process.communicate()
            killed = process.returncode == -signal.SIGKILL
            if "Traceback" in err or (not killed and process.returncode not in (0, 1)):
                figures.problems.append(f"round {round_}: exit {process.returncode}:\n{err}")
            after = ledger(store, issue.stem)
            in_flight = [e for e, s in after.items() if s == "sending"]
            figures.most_in_flight = max(figures.most_in_flight, len(in_flight))
            limit = connections * (API_BATCH if backend == "resend" else 1)  # a message or a batch a connection
            if len(in_flight) > limit:
                figures.problems.append(f"round {round_}: {len(in_flight)} rows in flight after the kill, "
                                        f"more than {limit}")
            uncertain_ever |= {(issue.stem, e) for e in in_flight}
            new_uncertain = {e for e, s in after.items() if s == "uncertain" and before.get(e) != "uncertain"}
            if len(new_uncertain - {e for e, s in before.items() if s == "sending"}) > 0 and backend == "smtp":
                figures.problems.append(f"round {round_}: uncertain rows that were not in flight: "
                                        f"{sorted(new_uncertain)[:5]}")
            if killed:
                figures.kills += 1
                figures.where[where_it_landed(before, after)] += 1
            say(f"round {round_}: {'killed' if killed else 'ended by itself'} after {delay:.2f} s "
                f"({issue.stem}: {Counter(after.values())})")
        last = subprocess.run([sys.executable, "-m", "newsletter", "send", str(issues[-1]),
                               *(["--resend-uncertain"] if backend == "resend" else [])],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if last.returncode not in (0, 1) or "Traceback" in last.stderr:
            figures.problems.append(f"the last run: exit {last.returncode}\n{last.stderr}")
        received = stop_server(server, backend, log)
        check(figures, store, issues, everyone, received, backend, uncertain_ever)
    finally:
        if server.poll() is None:
            server.kill()
        if own:
            shutil.rmtree(folder, ignore_errors=True)
    return figures


def where_it_landed(before: dict, after: dict) -> str:
    moved = {e: s for e, s in after.items() if before.get(e) != s}
    if not moved:
        return "start-up"  # reading, rendering: the ledger untouched
    if all(s == "pending" for s in moved.values()):
        return "enqueue"  # the rows were queued, nothing was handed to the server yet
    if all(s == "uncertain" and before.get(e) == "sending" for e, s in moved.items()):
        return "resume"  # the last kill's rows in flight settled, nothing sent yet
    return "mid-send"


def start_server(backend: str, folder: Path, log: Path):
    if backend == "smtp":
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve-smtp", str(port), str(log)], cwd=ROOT)
        wait_port(port)
        return server, port
    port_file = folder / "api.port"
    server = subprocess.Popen([sys.executable, __file__, "--serve-api", str(port_file), str(log)], cwd=ROOT)
    deadline = time.monotonic() + 20
    while not (port_file.exists() and port_file.read_text()):
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError("the API stand-in did not start")
        time.sleep(0.05)
    return server, int(port_file.read_text())


def stop_server(server, backend: str, log: Path) -> Counter:
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)
    return Counter(tuple(line.split("\t")) for line in log.read_text(encoding="utf-8").splitlines() if line)


def check(figures: Figures, store: Path | str, issues: list[Path], everyone: list[str], received: Counter,
          backend: str, in_flight_at_a_kill: set[tuple[str, str]]) -> None:
    """The server's count against the ledger, issue by issue."""
    by_issue: dict[str, Counter] = {}
    with open_ledger(store) as s:
        keys = {(issue, email): rkey for issue, email, rkey in s.db.execute("SELECT issue, email, rkey FROM deliveries")}
    figures.issues = len(issues)
    for (address, mid), n in received.items():
        # <issue.digest.recipient-key@domain>: the issue's stem and the reader's own key
        stem, _, rkey = mid.strip("<>").rsplit("@", 1)[0].rsplit(".", 2)
        if keys.get((stem, address)) != rkey:
            figures.problems.append(f"{n} message(s) to {address} ({mid}) that match no ledger row")
            continue
        by_issue.setdefault(stem, Counter())[address] += n
    for issue in issues:
        rows = ledger(store, issue.stem)
        got = by_issue.get(issue.stem, Counter())
        for address in everyone:
            state, n = rows.get(address), got[address]
            if n > 1:
                figures.duplicates += 1
                figures.problems.append(f"{issue.stem}: {address} got {n} messages (ledger: {state})")
            elif state == "sent" and n == 1:
                figures.delivered_once += 1
            elif state == "uncertain":
                figures.uncertain += 1
                figures.uncertain_delivered += n
                if (issue.stem, address) not in in_flight_at_a_kill:
                    figures.problems.append(f"{issue.stem}: {address} uncertain, but it was never in flight at a kill")
                if backend == "resend":
                    figures.problems.append(f"{issue.stem}: {address} uncertain after --resend-uncertain")
            else:
                figures.lost += 1
                figures.problems.append(f"{issue.stem}: {address} is {state} in the ledger and got {n}")


def new_issue(folder: Path, number: int) -> Path:
    """A copy of the example under a name of its own: a new send to the same list."""
    path = folder / "issues" / f"{EXAMPLE.stem}-{number:02d}.yaml"
    path.parent.mkdir(exist_ok=True)
    shutil.copyfile(EXAMPLE, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--recipients", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--backend", choices=("smtp", "resend"), default="smtp")
    parser.add_argument("--max-delay", type=float, default=2.5, help="kills land between 0 and this many seconds")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the ledger's store: SQLite, or a throwaway PostgreSQL server started here")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--serve-smtp", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--serve-api", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_smtp:
        serve_smtp(int(args.serve_smtp[0]), Path(args.serve_smtp[1]))
        return 0
    if args.serve_api:
        serve_api(Path(args.serve_api[0]), Path(args.serve_api[1]))
        return 0
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"{args.kills} kills, {args.recipients} recipients, {args.backend}, {args.connections} connections, "
          f"seed {seed}", file=sys.stderr)
    started = time.monotonic()
    say = (lambda text: print(text, file=sys.stderr)) if args.verbose else (lambda text: None)
    if args.store == "postgresql":
        sys.path.insert(0, str(ROOT / "tests"))
        import pg_server  # the tests' throwaway server: initdb in a temporary folder, as a non-root user
        os.environ.update(pg_server.PostgresServer.env())
        with pg_server.PostgresServer(durable=True) as pg:
            figures = run(args.kills, args.recipients, args.connections, args.backend, args.max_delay, seed,
                          say=say, store_url=pg.new_database())
    else:
        figures = run(args.kills, args.recipients, args.connections, args.backend, args.max_delay, seed, say=say)
    print(figures.table())
    print(f"({time.monotonic() - started:.0f} s)")
    for problem in figures.problems[:30]:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if figures.problems or figures.duplicates or figures.lost else 0


if __name__ == "__main__":
    sys.exit(main())
