"""Benchmark: how fast `newsletter send` pushes messages over SMTP, next to postfix's smtp-source, in one run.

Both talk to ONE postfix ``smtp-sink`` on 127.0.0.1 (a free port; it advertises PIPELINING
and throws every message away), so the figures are comparable on whatever machine runs this:

1. ours: a real ``python -m newsletter send ISSUE --to list.csv --config TMP/newsletter.toml``
   process (backend smtp, security none, S connections, connections never recycled) with a
   CSV list of N recipients and a fresh store; wall time from spawn to exit, so it includes
   Python start-up, rendering the issue, reading and checking the list and queueing N ledger
   rows. Checked afterwards: exit status 0, the ledger holds N ``sent`` rows, the sink
   counted N more messages.
   For context: the same send in-process, ``send_issue(...)`` on another fresh store.
2. anchor: ``smtp-source -s S -m N -l L -d`` (S parallel sessions, N messages in all,
   ``-d`` keeps each connection for the next message), with L chosen so that its messages
   are as big on the wire as ours (the issue's are about 40 KB). smtp-source speaks plain
   SMTP without PIPELINING (four round trips a message; ours are two) and keeps no ledger.
   Repeats (``--repeat R``) alternate ours and smtp-source: A B A B ...
   Goal: ours / smtp-source >= 0.7 messages/s (aim 1.0).
3. memory: peak RSS of ``newsletter send ISSUE --dry-run`` (builds every message, sends
   nothing, records nothing) against a store of 1,000,000 subscribers, from wait4() on
   that child alone; and its rate in messages built per second. Goal: under 200 MB.

smtp-sink and smtp-source come with the Debian package ``postfix``; the postfix daemon is
not used. If they are missing and this runs as root with apt-get, the package is installed
(DEBIAN_FRONTEND=noninteractive) and the daemon is stopped if the install started it.

4. ledgers (``--ledger``, instead of 1 to 3): the same `newsletter send --to list.csv`
   process with its ledger in SQLite, then in PostgreSQL (a throwaway server started here
   from Debian's postgresql, fsync on, default settings, on loopback), then two such
   processes at once against the one PostgreSQL ledger, splitting the list between them
   (wall time from the first start to the last exit); then, where this runs as root with a
   writable cgroup cpu controller, one sender and two senders again with each sender in a
   cgroup of its own capped at 0.35 of a CPU (``--cap``; the closest one machine comes to
   senders on machines of their own, with room left for the sink and the server).
   Checked: each PostgreSQL ledger holds N sent rows, the sink counted N messages a run.
   Goals: PostgreSQL >= 0.8x SQLite with one sender; two senders >= 1.5x one.
   ``--sessions S`` sets the SMTP sessions of every send, ``--runs`` picks runs.

Run it from anywhere with the project's venv python:

    .venv/bin/python bench/send.py            # N = 20,000, memory store 1,000,000; a few minutes
    .venv/bin/python bench/send.py --quick    # N = 2,000, memory store 100,000
    .venv/bin/python bench/send.py --profile  # also cProfile the in-process send
    .venv/bin/python bench/send.py --ledger --repeat 3   # SQLite, PostgreSQL, two senders

Exit status: 0 when everything ran (even if a goal is missed; the table says so), 1 when
something failed to run or a check failed, 2 when the project cannot be imported or the
postfix tools are missing. Standard library only, plus the project itself. All traffic
stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import pwd
import re
import shlex
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model, fresh_copy, ledger_counts, note, tool_version

ROOT = Path(__file__).resolve().parent.parent
ISSUE = "issues/2021-08-13-china-taliban.yaml"
CONFIG = "newsletter.toml"
SENDER = "brief@watchman.example"  # smtp-source's envelope, like ours
RECIPIENT = "reader@example.com"
HELO = "localhost"  # both sides: no hostname lookups

RATIO_GOAL, RATIO_AIM = 0.7, 1.0
MEMORY_GOAL_MB = 200.0
INSTALL_HELP = ("smtp-sink and smtp-source come with postfix; on Debian or Ubuntu: "
                "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y postfix, then sudo postfix stop "
                "(the bench does not use the daemon)")


def fail(message: str, code: int = 1) -> None:
    print(f"bench/send.py: {message}", file=sys.stderr)
    sys.exit(code)


# -- the postfix tools --------------------------------------------------------------------------

def find_tool(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name, Path("/usr/lib/postfix") / name)
                                       if p.is_file() and os.access(p, os.X_OK)), None)


def postfix_running() -> bool:
    postfix = find_tool("postfix")
    if postfix is None:
        return False
    return subprocess.run([postfix, "status"], capture_output=True).returncode == 0


def ensure_tools() -> tuple[str, str]:
    sink, source = find_tool("smtp-sink"), find_tool("smtp-source")
    if sink and source:
        return sink, source
    apt = shutil.which("apt-get")
    if os.geteuid() != 0 or apt is None:
        fail(f"smtp-sink/smtp-source not found. {INSTALL_HELP}", code=2)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    was_running = postfix_running()
    install = [apt, "install", "-y", "-q", "postfix"]
    for command in (install, [apt, "update", "-q"], install):  # update only if the first try fails
        note(f"installing postfix for smtp-sink/smtp-source (one time): {shlex.join(command)}")
        done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode == 0 and command is install:
            break
    if not was_running and postfix_running():  # the bench needs no MTA listening on port 25
        subprocess.run([find_tool("postfix") or "postfix", "stop"], capture_output=True)
        note("stopped the postfix daemon that the install started (the bench does not use it)")
    sink, source = find_tool("smtp-sink"), find_tool("smtp-source")
    if not (sink and source):
        fail(f"installing postfix did not provide smtp-sink/smtp-source. {INSTALL_HELP}", code=2)
    return sink, source


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sink:
    """One smtp-sink for the whole run; ``-c`` counters (sessions, messages) let us check
    that each side delivered what it claims."""

    def __init__(self, binary: str, folder: Path):
        self.port = free_port()
        self.log = folder / "smtp-sink.out"
        self.command = [binary, "-c"]
        if os.geteuid() == 0:  # it refuses to run as root without -u
            self.command += ["-u", "nobody" if _user_exists("nobody") else "daemon"]
        self.command += [f"127.0.0.1:{self.port}", "256"]
        self.out = open(self.log, "wb")
        self.proc = subprocess.Popen(self.command, stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                fail(f"smtp-sink exited at once ({self.proc.returncode}): {self.log.read_text(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    greeting = s.recv(512)
                    s.sendall(b"EHLO localhost\r\n")
                    ehlo = b""
                    while not re.search(rb"(^|\n)250 [^\n]*\n", ehlo):
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        ehlo += chunk
                    s.sendall(b"QUIT\r\n")
                    s.recv(512)
                break
            except OSError:
                if time.monotonic() > deadline:
                    fail(f"smtp-sink did not start listening on 127.0.0.1:{self.port}")
                time.sleep(0.05)
        if not greeting.startswith(b"220") or b"PIPELINING" not in ehlo:
            fail(f"smtp-sink on 127.0.0.1:{self.port} does not advertise PIPELINING: {ehlo!r}")
        self.pipelining = True

    def counters(self) -> tuple[int, int]:
        """(sessions ended, messages accepted) so far."""
        self.out.flush()
        time.sleep(0.05)  # let it write the counter for the last QUIT
        found = re.findall(rb"sess=(\d+) quit=\d+ mesg=(\d+)", self.log.read_bytes()[-400:])
        return (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)

    def cpu_seconds(self) -> float | None:
        """CPU time smtp-sink has used so far (Linux /proc), to show whether it is the limit."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


# -- our side: settings, stores ---------------------------------------------------------------------

def write_config(folder: Path, store: Path) -> Path:
    """The repo's newsletter.toml, with [design] templates pointing at the repo's templates
    and [store] path at ``store``."""
    wanted = {"design": ("templates", str(ROOT / "templates")), "store": ("path", str(store))}
    section, out, done = None, [], set()

    def close_section():  # the key was not in its section: add it at the section's end
        if section in wanted and section not in done:
            key, value = wanted[section]
            out.append(f"{key} = {json.dumps(value)}")
            done.add(section)

    for line in (ROOT / CONFIG).read_text(encoding="utf-8").splitlines():
        if m := re.match(r"\s*\[([A-Za-z_]+)\]", line):
            close_section()
            section = m.group(1)
        elif (m := re.match(r"\s*([A-Za-z_]+)\s*=", line)) and section in wanted and m.group(1) == wanted[section][0]:
            out.append(f"{m.group(1)} = {json.dumps(wanted[section][1])}")
            done.add(section)
            continue
        out.append(line)
    close_section()
    for section in wanted.keys() - done:  # sections the file lacks
        key, value = wanted[section]
        out.append(f"\n[{section}]\n{key} = {json.dumps(value)}")
    path = folder / "newsletter.toml"
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def make_list(path: Path, count: int) -> None:
    """A recipients CSV as a user exports one: email, name and one more column."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("email,name,city\r\n")
        f.writelines(f"reader{i:07d}@example.com,Reader {i},Springfield\r\n" for i in range(count))


def make_store(path: Path, count: int) -> None:
    """``count`` subscribed addresses, inserted with executemany in one transaction."""
    from newsletter.store import Store, now_iso

    Store(path).close()  # the schema
    db = sqlite3.connect(path, isolation_level=None)
    stamp = now_iso()
    db.execute("BEGIN")
    db.executemany("INSERT INTO subscribers (email, name, fields, changed_at, changed_how) VALUES (?, ?, NULL, ?, ?)",
                   ((f"reader{i:07d}@example.com", f"Reader {i}", stamp, "bench") for i in range(count)))
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def average_message_size(config_path: Path, env: dict[str, str], store: Path, recipients: Path
                         ) -> tuple[float, float]:
    """Our messages' average size: content bytes, and bytes on the wire (dot-stuffed, with
    the closing ".")—built exactly as `send` builds them, for every recipient in the list."""
    from newsletter.config import load_config
    from newsletter.message import MessageFactory
    from newsletter.reader import read_issue
    from newsletter.render import Renderer
    from newsletter.sender import make_signer

    config = load_config(config_path, environ=env)
    if config.store.path != store.resolve() or config.design.templates != (ROOT / "templates").resolve():
        fail(f"{config_path}: store or templates not where the bench put them: {config.store.path}, "
             f"{config.design.templates}")
    if (config.send.backend, config.smtp.host, config.smtp.security) != ("smtp", "127.0.0.1", "none"):
        fail(f"the NEWSLETTER_* overrides did not take: {config.send.backend} {config.smtp}")
    rendered = Renderer(config).render(read_issue(ROOT / ISSUE))
    signer = make_signer(config, allow_ephemeral=False, warnings=[])
    factory = MessageFactory(rendered, config, signer)
    from newsletter.recipients import CsvReport, read_csv

    content = wire = count = 0
    for r in read_csv(recipients, CsvReport()):
        data = factory.build(r.email, r.name, signer.recipient_key(r.email)).data
        stuffed = data.replace(b"\r\n.", b"\r\n..")
        content += len(data)
        wire += len(stuffed) + (0 if stuffed.endswith(b"\r\n") else 2) + 3
        count += 1
    return content / count, wire / count


def smtp_source_length(wire_size: float) -> tuple[int, int]:
    """(-l for smtp-source, its bytes on the wire). Its -l counts only the body lines; it
    adds From, To, Date and Message-Id headers, a blank line, a CRLF after the body and
    the closing "." (as a dump from smtp-sink -D shows)."""
    date = "Sat, 28 Nov 2026 00:51:39 +0000 (UTC)"
    headers = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nDate: {date}\r\n"
               f"Message-Id: <0612.0003.0000@{HELO}>\r\n\r\n")
    overhead = len(headers) + len("\r\n.\r\n")
    length = max(1, round(wire_size - overhead))
    return length, length + overhead


# -- timing ---------------------------------------------------------------------------------------

def send_env(sink, sessions: int) -> dict[str, str]:
    """Our send's environment: SMTP to the sink, plain, S connections never recycled."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update({
        "NEWSLETTER_SECRET": "bench-secret-not-for-real-use-0123456789abcdef",
        "NEWSLETTER_SEND_BACKEND": "smtp",
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(sink.port),
        "NEWSLETTER_SMTP_SECURITY": "none",
        "NEWSLETTER_SMTP_CONNECTIONS": str(sessions),
        "NEWSLETTER_SMTP_MESSAGES_PER_CONNECTION": "1000000",
        "NEWSLETTER_SMTP_HELO_NAME": HELO,
    })
    return env


def run_child(command: list[str], env: dict[str, str] | None, folder: Path, what: str) -> tuple[float, float, int, str]:
    """Run ``command`` in the repo root; (wall seconds, CPU seconds, peak RSS in KB, its
    output), the last two of that child alone (and its own children), from wait4. Exits on
    failure."""
    out_path = folder / f"{what.split()[0]}.{time.monotonic_ns()}.out"
    with open(out_path, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = out_path.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        sys.stderr.write(output)
        fail(f"{what} failed (exit {proc.returncode}): {shlex.join(command)}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, output


def send_in_process(config_path: Path, env: dict[str, str], recipients: Path,
                    profile: cProfile.Profile | None = None):
    from newsletter.config import load_config
    from newsletter.sender import send_issue

    config = load_config(config_path, environ=env)
    start = time.perf_counter()
    if profile:
        profile.enable()
    summary = send_issue(ROOT / ISSUE, config, to_csv=recipients)
    if profile:
        profile.disable()
    return time.perf_counter() - start, summary


def check_sent(store: Path, n: int, what: str) -> None:
    counts = ledger_counts(store, Path(ISSUE).stem)
    if counts.get("sent", 0) != n or sum(counts.values()) != n:
        fail(f"{what}: the ledger should hold {n} sent rows, it holds {counts}")


# -- main -----------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 2,000 messages, memory store of 100,000")
    parser.add_argument("--sessions", type=int, default=4, metavar="S",
                        help="SMTP connections for both sides (default 4; ours allows 1 to 64)")
    parser.add_argument("--messages", type=int, metavar="N", help="messages per run (default 20,000; --quick 2,000)")
    parser.add_argument("--repeat", type=int, default=1, metavar="R", help="runs of each side, alternated (default 1)")
    parser.add_argument("--subscribers-for-memory", type=int, metavar="M",
                        help="store size for the --dry-run memory figure (default 1,000,000; --quick 100,000; 0 skips)")
    parser.add_argument("--profile", action="store_true", help="also cProfile one in-process send and print the top")
    parser.add_argument("--ledger", action="store_true",
                        help="instead: the same send with its ledger in SQLite, in PostgreSQL, and two senders")
    parser.add_argument("--runs", metavar="R,R", help=f"with --ledger, only these runs ({','.join(LEDGER_RUNS)})")
    parser.add_argument("--cap", type=float, default=CpuCaps.SHARE, metavar="CPU",
                        help=f"with --ledger, each capped sender's CPU quota (default {CpuCaps.SHARE:g})")
    args = parser.parse_args()
    n = args.messages or (2_000 if args.quick else 20_000)
    memory_n = args.subscribers_for_memory if args.subscribers_for_memory is not None else (
        100_000 if args.quick else 1_000_000)
    sessions, repeat = args.sessions, max(1, args.repeat)
    if not 1 <= sessions <= 64:
        fail("--sessions must be from 1 to 64 (smtp.connections allows no more)")

    try:
        import newsletter  # noqa: F401
        from newsletter.config import load_config  # noqa: F401
        from newsletter.sender import send_issue  # noqa: F401
    except ImportError as exc:
        fail(f"cannot import the project ({exc}); run this with the project's venv python, "
             f"e.g. .venv/bin/python bench/send.py", code=2)

    sink_bin, source_bin = ensure_tools()
    if args.ledger:
        runs = args.runs.split(",") if args.runs else None
        if runs and not set(runs) <= LEDGER_RUNS.keys():
            fail(f"--runs takes {', '.join(LEDGER_RUNS)}")
        if not 0.05 <= args.cap <= os.cpu_count():
            fail(f"--cap must be from 0.05 to {os.cpu_count()} CPUs")
        CpuCaps.SHARE = args.cap
        return ledger_bench(sink_bin, n, sessions, repeat, runs)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    issue = Path(ISSUE).stem

    with tempfile.TemporaryDirectory(prefix="newsletter-bench-send-") as tmp:
        tmp_path = Path(tmp)
        sink = Sink(sink_bin, tmp_path)
        try:
            env = send_env(sink, sessions)
            note(f"writing a list of {n:,} recipients ...")
            template = tmp_path / "template.sqlite3"
            make_store(template, 0)  # an empty store: the list comes with --to
            recipients = tmp_path / "list.csv"
            make_list(recipients, n)
            note("measuring our message size ...")
            content_size, wire_size = average_message_size(write_config(tmp_path, template), env, template,
                                                           recipients)
            length, source_wire = smtp_source_length(wire_size)

            ours_cmd_shown = [sys.executable, "-m", "newsletter", "send", ISSUE, "--to", "TMP/list.csv",
                              "--config", "TMP/newsletter.toml"]
            source_cmd = [source_bin, "-s", str(sessions), "-m", str(n), "-l", str(length), "-d", "-M", HELO,
                          "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{sink.port}"]

            ours_times: list[float] = []
            inproc_times: list[float] = []
            source_times: list[float] = []
            ours_cpu: list[float] = []  # CPU seconds per wall second
            source_cpu: list[float] = []
            sink_with_ours: list[float] = []
            sink_with_source: list[float] = []
            ours_sessions = source_sessions = 0
            for r in range(repeat):
                # A: our send, as a process.
                run_dir = tmp_path / f"run{r}"
                store = fresh_copy(template, run_dir)
                config_path = write_config(run_dir, store)
                ours_cmd = [sys.executable, "-m", "newsletter", "send", ISSUE, "--to", str(recipients),
                            "--config", str(config_path)]
                note(f"[{r + 1}/{repeat}] newsletter send, {n:,} messages, {sessions} connections ...")
                s0, m0 = sink.counters()
                c0 = sink.cpu_seconds()
                elapsed, cpu, _, output = run_child(ours_cmd, env, tmp_path, "newsletter send")
                s1, m1 = sink.counters()
                c1 = sink.cpu_seconds()
                check_sent(store, n, "newsletter send")
                if m1 - m0 != n:
                    fail(f"newsletter send: smtp-sink counted {m1 - m0} messages, not {n}")
                if f"sent {n}," not in output:
                    fail(f"newsletter send: unexpected output:\n{output}")
                ours_times.append(elapsed)
                ours_cpu.append(cpu / elapsed)
                if c0 is not None and c1 is not None:
                    sink_with_ours.append((c1 - c0) / elapsed)
                ours_sessions = s1 - s0

                # B: smtp-source.
                note(f"[{r + 1}/{repeat}] smtp-source, {n:,} messages, {sessions} sessions ...")
                elapsed, cpu, _, _ = run_child(source_cmd, None, tmp_path, "smtp-source")
                s2, m2 = sink.counters()
                c2 = sink.cpu_seconds()
                if m2 - m1 != n:
                    fail(f"smtp-source: smtp-sink counted {m2 - m1} messages, not {n}")
                source_times.append(elapsed)
                source_cpu.append(cpu / elapsed)
                if c1 is not None and c2 is not None:
                    sink_with_source.append((c2 - c1) / elapsed)
                source_sessions = s2 - s1

                # Context: the same send in-process, on another fresh store.
                inproc_dir = tmp_path / f"inproc{r}"
                store = fresh_copy(template, inproc_dir)
                note(f"[{r + 1}/{repeat}] send_issue in-process ...")
                elapsed, summary = send_in_process(write_config(inproc_dir, store), env, recipients)
                check_sent(store, n, "send_issue")
                if summary.this_run["sent"] != n:
                    fail(f"send_issue: sent {summary.this_run}")
                inproc_times.append(elapsed)

            profile_text = None
            if args.profile:
                prof_dir = tmp_path / "profile"
                store = fresh_copy(template, prof_dir)
                note("profiling send_issue in-process (cProfile) ...")
                profile = cProfile.Profile()
                send_in_process(write_config(prof_dir, store), env, recipients, profile)
                check_sent(store, n, "send_issue (profiled)")
                buf = io.StringIO()
                stats = pstats.Stats(profile, stream=buf).strip_dirs()
                stats.sort_stats("tottime").print_stats(20)
                stats.sort_stats("cumulative").print_stats(25)
                profile_text = buf.getvalue()
        finally:
            sink.stop()

        # Memory: --dry-run against a big store.
        memory = None
        if memory_n > 0:
            note(f"building a store of {memory_n:,} subscribers for the memory figure ...")
            mem_dir = tmp_path / "memory"
            mem_dir.mkdir()
            start = time.perf_counter()
            make_store(mem_dir / "newsletter.sqlite3", memory_n)
            store_seconds = time.perf_counter() - start
            mem_cmd = [sys.executable, "-m", "newsletter", "send", ISSUE, "--dry-run",
                       "--config", str(write_config(mem_dir, mem_dir / "newsletter.sqlite3"))]
            note(f"newsletter send --dry-run over {memory_n:,} subscribers ...")
            elapsed, _, maxrss_kb, output = run_child(mem_cmd, env, tmp_path, "newsletter send --dry-run")
            if f"built {memory_n} message" not in output:
                fail(f"--dry-run: unexpected output:\n{output}")
            if ledger_counts(mem_dir / "newsletter.sqlite3", issue):
                fail("--dry-run recorded deliveries in the ledger")
            memory = (elapsed, maxrss_kb / 1024, store_seconds)

    # Report.
    med = statistics.median
    ours_s, source_s, inproc_s = med(ours_times), med(source_times), med(inproc_times)
    ours_rate, source_rate, inproc_rate = n / ours_s, n / source_s, n / inproc_s
    ratio, inproc_ratio = ours_rate / source_rate, inproc_rate / source_rate
    ratio_ok = ratio >= RATIO_GOAL
    memory_ok = memory is None or memory[1] < MEMORY_GOAL_MB

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    runs = f"median of {repeat}" if repeat > 1 else "1 run"
    rows = [
        (f"ours: `newsletter send` process ({runs})", f"{ours_rate:10,.0f} msg/s", f"{ours_s:7.2f} s", "", ""),
        (f"  context: send_issue() in-process ({runs})", f"{inproc_rate:10,.0f} msg/s", f"{inproc_s:7.2f} s", "", ""),
        (f"anchor: smtp-source -d, -l {length} ({runs})", f"{source_rate:10,.0f} msg/s", f"{source_s:7.2f} s", "", ""),
        ("ratio ours / smtp-source", f"{ratio:10.2f} x", "", f">= {RATIO_GOAL:g} x (aim {RATIO_AIM:g})",
         verdict(ratio_ok)),
        ("  context: in-process / smtp-source", f"{inproc_ratio:10.2f} x", "", "", ""),
    ]
    if memory:
        mem_s, mem_mb, _ = memory
        rows += [
            (f"peak RSS, `send --dry-run`, {memory_n:,} subscribers", f"{mem_mb:10.1f} MB", f"{mem_s:7.2f} s",
             f"< {MEMORY_GOAL_MB:g} MB", verdict(memory_ok)),
            ("  dry run: messages built per second", f"{memory_n / mem_s:10,.0f} msg/s", "", "", ""),
        ]
    headers = ("figure", "value", "time", "goal", "status")
    widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(len(headers))]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    postfix_version = tool_version([find_tool("postconf") or "postconf", "-d", "-h", "mail_version"])
    flags = (" --quick" * args.quick + (f" --sessions {sessions}" if sessions != 4 else "")
             + (f" --messages {n}" if args.messages else "") + (f" --repeat {repeat}" if repeat > 1 else "")
             + (f" --subscribers-for-memory {memory_n}" if args.subscribers_for_memory is not None else "")
             + " --profile" * args.profile)
    rerun = f"cd {shlex.quote(str(ROOT))} && {shlex.quote(sys.executable)} bench/send.py{flags}"

    print(f"newsletter send benchmark: {ISSUE}, {n:,} messages over {sessions} SMTP sessions to one smtp-sink"
          f" on 127.0.0.1 (PIPELINING advertised; ours uses it, smtp-source cannot)")
    print(f"machine: {platform.system()} {platform.machine()}, {cpu_model()}, nproc {affinity}"
          f" (cpu_count {os.cpu_count()}), Python {platform.python_version()}, postfix {postfix_version}"
          f" (smtp-sink, smtp-source), SQLite {sqlite3.sqlite_version}"
          + (f", load average {load_before[0]:.2f} at start" if load_before else ""))
    print(f"message size: ours {content_size / 1024:.1f} KB on average ({content_size:,.0f} bytes; {wire_size:,.0f}"
          f" on the wire, dot-stuffed), smtp-source -l {length} -> {source_wire:,} bytes"
          f" on the wire with its own headers, the same size")
    print(f"sessions used (smtp-sink's count): ours {ours_sessions}, smtp-source {source_sessions};"
          f" runs alternated A B A B; ours is wall time of the whole process (start-up, render, queueing"
          f" {n:,} ledger rows, sending)")
    cpu_line = f"CPU busy (CPU s per wall s): `newsletter send` {med(ours_cpu):.0%}, smtp-source {med(source_cpu):.0%}"
    if sink_with_ours and sink_with_source:
        cpu_line += f"; smtp-sink {med(sink_with_ours):.0%} during ours, {med(sink_with_source):.0%} during smtp-source"
    print(cpu_line + f" (100% = one core of {affinity})")
    print()
    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    print()
    print(f"checked: exit status 0, ledger {n:,} sent, smtp-sink counted {n:,} messages from each side"
          + (f"; --dry-run recorded nothing (store of {memory_n:,} built in {memory[2]:.1f} s)" if memory else ""))
    if args.quick:
        print(f"--quick: {n:,} messages" + (f" and a memory store of {memory_n:,} subscribers" if memory else "")
              + " (the full run uses 20,000 and 1,000,000; quick figures are rough)")
    print(f"ours:        {shlex.join(ours_cmd_shown)}")
    print(f"             env NEWSLETTER_SEND_BACKEND=smtp NEWSLETTER_SMTP_HOST=127.0.0.1 NEWSLETTER_SMTP_PORT=PORT"
          f" NEWSLETTER_SMTP_SECURITY=none NEWSLETTER_SMTP_CONNECTIONS={sessions}"
          f" NEWSLETTER_SMTP_MESSAGES_PER_CONNECTION=1000000 NEWSLETTER_SMTP_HELO_NAME={HELO} NEWSLETTER_SECRET=...")
    print(f"anchor:      {shlex.join(['smtp-source', *source_cmd[1:-1], '127.0.0.1:PORT'])}")
    print(f"sink:        {shlex.join(['smtp-sink', *sink.command[1:-2], '127.0.0.1:PORT', '256'])}")
    if memory:
        memory_cmd = [sys.executable, "-m", "newsletter", "send", ISSUE, "--dry-run", "--config", "TMP/newsletter.toml"]
        print(f"memory:      {shlex.join(memory_cmd)} (peak RSS of that child from wait4)")
    print(f"rerun: {rerun}")
    if not (ratio_ok and memory_ok):
        print("goal missed: " + "; ".join(
            text for ok, text in (
                (ratio_ok, f"ours is {ratio:.2f}x smtp-source's messages/s, under {RATIO_GOAL:g}x"),
                (memory_ok, f"peak RSS {memory[1] if memory else 0:.0f} MB is over {MEMORY_GOAL_MB:g} MB"),
            ) if not ok) + ("" if args.profile else " (rerun with --profile to see where the time goes)"))
    if profile_text:
        print()
        print("cProfile of one in-process send_issue():")
        print(profile_text.rstrip())
    return 0


# -- ledgers: SQLite, PostgreSQL, two senders ---------------------------------------------------------

PG_GOAL, TWO_GOAL = 0.8, 1.5


def ledger_bench(sink_bin: str, n: int, sessions: int, repeat: int, runs: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    import pg_server  # the tests' throwaway server: initdb in a temporary folder, as a non-root user

    if not pg_server.installed():
        fail("PostgreSQL's server binaries are missing: apt-get install -y postgresql", code=2)
    wanted = [k for k in LEDGER_RUNS if runs is None or k in runs]
    capped = any(k.endswith("capped") for k in wanted)
    caps = CpuCaps.make(2) if capped else None  # a CPU quota for each sender of the capped runs
    if capped and not caps and runs:
        fail(f"capped runs cannot be made here: {CpuCaps.why_not}")
    kinds = [k for k in wanted if caps or not k.endswith("capped")]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    busy: dict[str, list[float]] = {k: [] for k in kinds}  # the machine's CPUs, all of them
    os.environ.update(pg_server.PostgresServer.env())  # the password, for our own checks of the ledger
    with tempfile.TemporaryDirectory(prefix="newsletter-bench-ledger-") as tmp, \
            pg_server.PostgresServer(durable=True) as pg:
        tmp_path = Path(tmp)
        sink = Sink(sink_bin, tmp_path)
        try:
            env = {**send_env(sink, sessions), **pg.env()}
            recipients = tmp_path / "list.csv"
            make_list(recipients, n)
            template = tmp_path / "template.sqlite3"
            make_store(template, 0)
            for r in range(repeat):
                run_dir = tmp_path / f"run{r}"
                store = fresh_copy(template, run_dir)
                command = [sys.executable, "-m", "newsletter", "send", ISSUE, "--to", str(recipients),
                           "--config", str(write_config(run_dir, store))]
                m0 = sink.counters()[1]
                for kind in kinds:
                    note(f"[{r + 1}/{repeat}] {LEDGER_RUNS[kind]} ...")
                    run_env = env if kind == "sqlite" else {**env, "NEWSLETTER_STORE_URL": pg.new_database()}
                    b0 = machine_busy()
                    times[kind].append(run_senders(command, run_env, 2 if kind.startswith("two") else 1,
                                                   caps if kind.endswith("capped") else None))
                    busy[kind].append(machine_busy(b0))
                    if kind == "sqlite":
                        check_sent(store, n, "newsletter send (SQLite)")
                    else:
                        check_pg_sent(run_env["NEWSLETTER_STORE_URL"], n)
                if sink.counters()[1] - m0 != len(kinds) * n:
                    fail(f"smtp-sink counted {sink.counters()[1] - m0} messages over the {len(kinds)} runs, "
                         f"not {len(kinds) * n}")
        finally:
            sink.stop()
            if caps:
                caps.remove()
        server_version = pg.version()

    med = statistics.median
    rate = {k: n / med(v) for k, v in times.items()}
    medians = f"median of {repeat}" if repeat > 1 else "1 run"
    print(f"ledger benchmark: `newsletter send {ISSUE} --to list.csv`, {n:,} messages over {sessions} SMTP sessions"
          f" each, to one smtp-sink on 127.0.0.1; {medians}, runs alternated; nproc {os.cpu_count()}, "
          f"SQLite {sqlite3.sqlite_version}, PostgreSQL {server_version} (fsync on, default settings, loopback)")

    def line(kind: str, against: str | None = None, goal: float | None = None, what: str = "") -> None:
        if kind not in rate:  # left out by --runs
            return
        if against not in rate:
            against = goal = None
        ratio = f"{rate[kind] / rate[against]:6.3f}x {what}" if against else ""
        verdict = f" (goal >= {goal:g}x: {'ok' if rate[kind] / rate[against] >= goal else 'MISSED'})" if goal else ""
        print(f"  {LEDGER_RUNS[kind]:<48}{rate[kind]:8,.0f} msg/s  {ratio:<22}{verdict:<28}"
              f"machine {med(busy[kind]):.0%} busy")

    line("sqlite")
    line("pg", "sqlite", PG_GOAL, "SQLite")
    line("two", "pg", TWO_GOAL, "one sender")
    if capped and not caps:
        print(f"  (senders capped at {CpuCaps.SHARE:g} CPU each: not measured, {CpuCaps.why_not})")
    line("pg_capped")
    line("two_capped", "pg_capped", TWO_GOAL, "one capped")
    print(f"machine busy: all {os.cpu_count()} CPUs (our senders, smtp-sink and PostgreSQL together), from /proc/stat;"
          f" capped: each sender in a cgroup of its own with a quota of {CpuCaps.SHARE:g} CPU, standing in for a"
          " machine of its own (the sink and the server are not capped)")
    print(f"checked: each run's ledger holds {n:,} sent rows and smtp-sink counted {n:,} messages")
    print(f"rerun: cd {shlex.quote(str(ROOT))} && {shlex.quote(sys.executable)} bench/send.py --ledger"
          + (f" --messages {n}" if n != 20_000 else "") + (f" --sessions {sessions}" if sessions != 4 else "")
          + (f" --repeat {repeat}" if repeat > 1 else "") + (f" --runs {','.join(runs)}" if runs else "")
          + (f" --cap {CpuCaps.SHARE:g}" if caps and CpuCaps.SHARE != CpuCaps.DEFAULT else ""))
    return 0


LEDGER_RUNS = {
    "sqlite": "SQLite ledger, one sender",
    "pg": "PostgreSQL ledger, one sender",
    "two": "PostgreSQL ledger, two senders at once",
    "pg_capped": "PostgreSQL, one sender capped",
    "two_capped": "PostgreSQL, two senders at once, each capped",
}


def run_senders(command: list[str], env: dict[str, str], count: int, caps: "CpuCaps | None") -> float:
    """`count` send processes at once (each in a capped cgroup of its own when `caps`);
    wall seconds from the first start to the last exit. Exits on a failure."""
    start = time.perf_counter()
    senders = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                preexec_fn=(lambda i=i: caps.enter(i)) if caps else None) for i in range(count)]
    outputs = [p.communicate()[0].decode(errors="replace") for p in senders]
    elapsed = time.perf_counter() - start
    for p, output in zip(senders, outputs):
        if p.returncode != 0:
            fail(f"newsletter send exited {p.returncode}:\n{output}")
    return elapsed


class CpuCaps:
    """A cgroup (v1 cpu controller, or v2 cpu.max) for each of `count` senders, with a
    quota of SHARE CPU each: on one machine, the closest thing to senders on machines of
    their own. Needs root and a writable cgroup file system; make() says None otherwise.

    The default leaves the sink and the server, which are not capped, room for two
    senders' traffic, as they would have on machines of their own: at half a CPU each,
    two senders, the sink and the server kept a 2-CPU machine 83% busy, as busy as one
    uncapped sender keeps it, and the figure was the machine's, not the senders'."""

    DEFAULT = 0.35
    SHARE = DEFAULT
    why_not = ""

    def __init__(self, folders: list[Path]):
        self.folders = folders

    @classmethod
    def make(cls, count: int) -> "CpuCaps | None":
        period = 100_000
        for base, write in ((Path("/sys/fs/cgroup/cpu"), cls._v1), (Path("/sys/fs/cgroup"), cls._v2)):
            if not (base / "cgroup.procs").exists():
                continue
            folders = [base / f"newsletter-bench-{os.getpid()}-{i}" for i in range(count)]
            try:
                for folder in folders:
                    folder.mkdir(exist_ok=True)
                    write(folder, int(cls.SHARE * period), period)
                return cls(folders)
            except OSError as exc:
                cls.why_not = f"{base}: {exc.strerror or exc}"
                cls(folders).remove()
        cls.why_not = cls.why_not or "no cgroup cpu controller here"
        return None

    @staticmethod
    def _v1(folder: Path, quota: int, period: int) -> None:
        (folder / "cpu.cfs_period_us").write_text(str(period))
        (folder / "cpu.cfs_quota_us").write_text(str(quota))

    @staticmethod
    def _v2(folder: Path, quota: int, period: int) -> None:
        (folder / "cpu.max").write_text(f"{quota} {period}")

    def enter(self, i: int) -> None:
        """In the child, before exec: into cgroup i."""
        (self.folders[i] / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        for folder in self.folders:
            try:
                folder.rmdir()
            except OSError:
                pass


def machine_busy(since: tuple[int, int] | None = None):
    """/proc/stat's CPU counters now, or the share of all CPUs busy since `since`."""
    values = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    now = (sum(values) - values[3] - values[4], sum(values))  # idle and iowait are not busy
    if since is None:
        return now
    return (now[0] - since[0]) / max(now[1] - since[1], 1)


def check_pg_sent(url: str, n: int) -> None:
    from newsletter.store import open_at

    with open_at(url) as store:
        counts = store.counts(Path(ISSUE).stem)
    if counts["sent"] != n or sum(counts.values()) != n:
        fail(f"PostgreSQL ledger should hold {n} sent rows, it holds {counts}")


if __name__ == "__main__":
    sys.exit(main())
