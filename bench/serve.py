"""One-click unsubscribes a second through `newsletter serve`, against a bare hello-world
Starlette app on the same server stack (uvicorn, one process), in the same run, alternated.

    .venv/bin/python bench/serve.py [--subscribers N] [--seconds S] [--repeat R] [--connections C] [--quick]

Ours: a real `python -m newsletter serve` process on a fresh copy of a store of N
subscribers, each with a ledger row (as after a send); wrk POSTs
`List-Unsubscribe=One-Click` once to each of the N distinct valid tokens, and every one is
committed to the store (checked afterwards: as many unsubscribed as answers, no non-2xx). The anchor: the
same wrk script, the same requests, to a Starlette app whose one route answers
"Hello, world" to anything, run by uvicorn with the same options. The load generator is
Debian's `wrk` (C, with a Lua script), so that the client is not the limit, for a fixed
time per run (wrk cannot stop after N requests without waiting out its duration); N must
exceed what a run gets through, or the bench stops and says so. The script installs wrk
with apt-get when it is missing and it runs as root.
Prints both rates, their ratio, and the goal (at least 0.5x).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_model, fresh_copy, note, tool_version  # noqa: E402

ISSUE = "2021-08-13-china-taliban"
SECRET = "bench-secret-not-for-production"
GOAL = 0.5

LUA = r"""
-- Each wrk thread POSTs its own share of the tokens, each once (the bench checks that the
-- run was short enough never to come round to a token again).
local threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end
function init(args)
  local file, share = args[1], tonumber(args[2])
  tokens, sent = {}, 0
  local i = 0
  for line in io.lines(file) do
    if i % share == id then tokens[#tokens + 1] = line end
    i = i + 1
  end
  headers = {["Content-Type"] = "application/x-www-form-urlencoded"}
end
function request()
  sent = sent + 1
  local token = tokens[(sent - 1) % #tokens + 1]
  return wrk.format("POST", "/unsubscribe/" .. token, headers, "List-Unsubscribe=One-Click")
end
"""

HELLO = """
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

async def hello(request):
    return PlainTextResponse("Hello, world")

app = Starlette(routes=[Route("/{path:path}", hello, methods=["GET", "POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), server_header=False, log_level="warning", access_log=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        note("bench/serve.py needs wrk (Debian package `wrk`): apt-get install wrk")
        sys.exit(2)
    note("installing wrk (apt-get install wrk)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "wrk"], env=env, check=False,
                   stdout=subprocess.DEVNULL)
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "wrk"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return shutil.which("wrk")


def settings(folder: Path, store: Path) -> dict:
    outside = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    return {**outside, "NEWSLETTER_SECRET": SECRET, "NEWSLETTER_STORE_PATH": str(store),
            "NEWSLETTER_DESIGN_TEMPLATES": str(ROOT / "templates")}


def make_store(folder: Path, n: int) -> tuple[Path, Path]:
    """A store of n subscribers with ledger rows, and the file of their n tokens."""
    from newsletter.config import load_config
    from newsletter.recipients import Recipient
    from newsletter.store import Store
    from newsletter.tokens import Signer

    store_path = folder / "template.sqlite3"
    config = load_config(ROOT / "newsletter.toml", environ=settings(folder, store_path))
    signer = Signer(SECRET.encode(), config.publication.list_id)
    emails = [f"reader{i}@example.com" for i in range(n)]
    with Store(store_path) as store:
        with store.transaction():
            for email in emails:
                store.add(Recipient(email), "bench")
        store.enqueue_subscribers(ISSUE, signer.recipient_key)
    tokens = folder / "tokens.txt"
    tokens.write_text("".join(signer.token(signer.recipient_key(e)) + "\n" for e in emails))
    return store_path, tokens


def wait_up(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the server did not start within 60 s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_wrk(wrk: str, port: int, script: Path, tokens: Path, connections: int,
            seconds: float) -> tuple[float, int, int]:
    """(requests a second, requests, non-2xx) as wrk reports them."""
    done = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), f"http://127.0.0.1:{port}",
                           "--", str(tokens), "1"], capture_output=True, text=True, check=True)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))
    total = int(re.search(r"(\d+) requests in", done.stdout).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    errors = re.search(r"Socket errors: (.*)", done.stdout)
    if errors:
        note(f"wrk: socket errors: {errors.group(1)}")
    return rate, total, int(bad.group(1)) if bad else 0


def ours(wrk, folder, template, tokens, script, n, connections, seconds, run) -> float:
    store = fresh_copy(template, folder / f"ours-{run}")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "newsletter", "serve", "--port", str(port)], cwd=ROOT,
                            env=settings(folder, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(port, proc)
        rate, total, bad = run_wrk(wrk, port, script, tokens, connections, seconds)
    finally:
        stop(proc)
    import sqlite3
    db = sqlite3.connect(store)
    unsubscribed = db.execute("SELECT count(*) FROM subscribers WHERE status = 'unsubscribed'").fetchone()[0]
    db.close()
    if total > n:
        raise SystemExit(f"ours, run {run}: {total} requests for {n} tokens: raise --subscribers")
    # Every answered POST was committed; those still in flight when wrk stopped may be too.
    if bad or not total <= unsubscribed <= total + connections:
        raise SystemExit(f"ours, run {run}: {bad} non-2xx answers; {unsubscribed} unsubscribed for {total} answers")
    note(f"  ours   run {run}: {rate:,.0f}/s ({total} requests, {unsubscribed} committed)")
    return rate


def anchor(wrk, folder, tokens, script, connections, seconds, run) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", HELLO, str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_up(port, proc)
        rate, total, bad = run_wrk(wrk, port, script, tokens, connections, seconds)
    finally:
        stop(proc)
    if bad:
        raise SystemExit(f"anchor, run {run}: {bad} non-2xx answers")
    note(f"  anchor run {run}: {rate:,.0f}/s ({total} requests)")
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=60_000,
                        help="subscribers, with as many distinct tokens (more than a run gets through)")
    parser.add_argument("--seconds", type=float, default=10, help="length of each run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side, alternated; medians")
    parser.add_argument("--connections", type=int, default=32, help="wrk's open connections")
    parser.add_argument("--quick", action="store_true", help="3-second runs, 2 of each")
    args = parser.parse_args()
    if args.quick:
        args.subscribers, args.seconds, args.repeat = 20_000, 3, 2
    wrk = ensure_wrk()
    import uvicorn

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        script = folder / "one-click.lua"
        script.write_text(LUA)
        note(f"making a store of {args.subscribers:,} subscribers with ledger rows and tokens")
        template, tokens = make_store(folder, args.subscribers)
        mine, theirs = [], []
        for run in range(1, args.repeat + 1):  # A B A B ...
            mine.append(ours(wrk, folder, template, tokens, script, args.subscribers, args.connections,
                             args.seconds, run))
            theirs.append(anchor(wrk, folder, tokens, script, args.connections, args.seconds, run))
    a, b = statistics.median(mine), statistics.median(theirs)
    print(f"machine: {os.cpu_count()} CPUs ({cpu_model()}), Python {sys.version.split()[0]}, "
          f"uvicorn {uvicorn.__version__}, wrk {tool_version(['dpkg-query', '-W', '-f=${Version}', 'wrk'])}")
    print(f"command: .venv/bin/python bench/serve.py --subscribers {args.subscribers} --seconds {args.seconds:g} "
          f"--repeat {args.repeat} --connections {args.connections}")
    print()
    print("| figure | value | goal |")
    print("|---|---|---|")
    print(f"| one-click unsubscribes through `newsletter serve`, each committed | {a:,.0f}/s (median of {len(mine)}) | |")
    print(f"| hello-world Starlette on uvicorn, same requests | {b:,.0f}/s | |")
    print(f"| ratio | **{a / b:.2f}×** | ≥ {GOAL}× {'(met)' if a / b >= GOAL else '(missed)'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
