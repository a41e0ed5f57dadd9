"""Benchmark: how fast `newsletter` builds an issue, next to the official MJML tool, in one run.

Measures, for issues/2021-08-13-china-taliban.yaml with newsletter.toml (repo root):

1. warm build, in-process: ``Renderer.render(read_issue(path))`` (YAML -> MJML -> HTML,
   web page and plain text) repeated many times after a few warm-up runs; median and p90.
   Goal: under 10 ms. For context, mjml-python's ``mjml2html`` alone on the same MJML.
2. cold build: a fresh ``python -m newsletter build ISSUE --out TMP`` process; median wall
   time. One untimed warm-up run first, so OS file caches and Jinja's bytecode cache are warm.
3. anchor: the official MJML command-line tool (npm ``mjml@4``) compiling the SAME MJML
   (the one our build produced) as a cold process: ``mjml in.mjml -o out.html``; median.
   Its cold runs are interleaved with ours (A B A B ...) so machine noise hits both alike.
   Goal: our cold build takes at most 0.8x the MJML CLI's time.

The MJML CLI is installed on first use into bench/.node/ (git-ignored) with npm.

Run it from anywhere with the project's venv python:

    .venv/bin/python bench/build.py            # full run, about a minute
    .venv/bin/python bench/build.py --quick    # fewer iterations

Exit status: 0 when everything ran (even if a goal is missed; the table says so), 1 when
something failed to run, 2 when the project cannot be imported. Standard library only,
plus the project itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import tool_version

ROOT = Path(__file__).resolve().parent.parent
ISSUE = "issues/2021-08-13-china-taliban.yaml"
CONFIG = "newsletter.toml"
NODE_DIR = ROOT / "bench" / ".node"
MJML_BIN = NODE_DIR / "node_modules" / ".bin" / "mjml"
MJML_PACKAGE = NODE_DIR / "node_modules" / "mjml" / "package.json"

WARM_GOAL_MS = 10.0
COLD_RATIO_GOAL = 0.8


def fail(message: str, code: int = 1) -> None:
    print(f"bench/build.py: {message}", file=sys.stderr)
    sys.exit(code)


def ms(ns: int) -> float:
    return ns / 1e6


def median(values: list[float]) -> float:
    return statistics.median(values)


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def ensure_mjml_cli() -> None:
    if MJML_BIN.exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        fail("npm not found; it is needed once to install the MJML CLI into bench/.node/")
    command = [npm, "install", "--prefix", str(NODE_DIR), "mjml@4", "--no-audit", "--no-fund", "--silent"]
    print(f"installing the MJML CLI (one time): {shlex.join(command)}", file=sys.stderr, flush=True)
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(command, cwd=ROOT)
    if done.returncode != 0 or not MJML_BIN.exists():
        fail(f"npm install failed (exit {done.returncode}); {MJML_BIN} is missing")


def timed_run(command: list[str], what: str) -> float:
    """Run ``command`` in the repo root; return its wall time in ms, or exit on failure."""
    start = time.perf_counter_ns()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    elapsed = ms(time.perf_counter_ns() - start)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        fail(f"{what} failed (exit {done.returncode}): {shlex.join(command)}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a rough figure in seconds)")
    args = parser.parse_args()
    warmups, warm_runs, cold_runs = (3, 30, 5) if args.quick else (5, 200, 15)

    try:
        import mjml
        from newsletter.config import load_config
        from newsletter.reader import read_issue
        from newsletter.render import Renderer
    except ImportError as exc:
        fail(f"cannot import the project ({exc}); run this with the project's venv python, "
             f"e.g. .venv/bin/python bench/build.py", code=2)

    ensure_mjml_cli()
    issue_path = ROOT / ISSUE

    # 1. Warm, in-process.
    renderer = Renderer(load_config(ROOT / CONFIG))
    for _ in range(warmups):
        rendered = renderer.render(read_issue(issue_path))
    warm: list[float] = []
    for _ in range(warm_runs):
        start = time.perf_counter_ns()
        rendered = renderer.render(read_issue(issue_path))
        warm.append(ms(time.perf_counter_ns() - start))
    mjml_source = rendered.mjml

    # For context: mjml-python alone on the same MJML.
    for _ in range(warmups):
        mjml.mjml2html(mjml_source, fonts={})
    mrml: list[float] = []
    for _ in range(warm_runs):
        start = time.perf_counter_ns()
        mjml.mjml2html(mjml_source, fonts={})
        mrml.append(ms(time.perf_counter_ns() - start))

    # 2 and 3. Cold processes, interleaved.
    with tempfile.TemporaryDirectory(prefix="newsletter-bench-") as tmp:
        tmp_path = Path(tmp)
        mjml_in, mjml_out = tmp_path / "in.mjml", tmp_path / "out.html"
        mjml_in.write_text(mjml_source, encoding="utf-8")
        ours_cmd = [sys.executable, "-m", "newsletter", "build", ISSUE, "--out", str(tmp_path / "dist")]
        theirs_cmd = [str(MJML_BIN), str(mjml_in), "-o", str(mjml_out)]

        # Untimed warm-ups: OS file caches, Jinja's on-disk bytecode cache, node's modules.
        timed_run(ours_cmd, "newsletter build (warm-up)")
        timed_run(theirs_cmd, "mjml CLI (warm-up)")
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(cold_runs):
            ours.append(timed_run(ours_cmd, "newsletter build"))
            theirs.append(timed_run(theirs_cmd, "mjml CLI"))

        built = tmp_path / "dist" / Path(ISSUE).stem / "email.html"
        if not built.is_file() or not mjml_out.is_file() or mjml_out.stat().st_size == 0:
            fail("a cold run exited 0 but did not write its HTML")
        ours_html_kb = built.stat().st_size / 1024
        theirs_html_kb = mjml_out.stat().st_size / 1024

    # Report.
    mjml_version = json.loads(MJML_PACKAGE.read_text(encoding="utf-8")).get("version", "?")
    try:
        from importlib.metadata import version
        mjml_python_version = version("mjml-python")
    except Exception:
        mjml_python_version = "?"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    warm_med, cold_med, cli_med = median(warm), median(ours), median(theirs)
    cold_ratio = cold_med / cli_med
    warm_ratio = warm_med / WARM_GOAL_MS
    warm_ok, cold_ok = warm_med < WARM_GOAL_MS, cold_ratio <= COLD_RATIO_GOAL

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    rows = [
        (f"warm build in-process, read + render ({warm_runs} runs)",
         f"{warm_med:8.2f} ms", f"{p90(warm):8.2f} ms", f"< {WARM_GOAL_MS:g} ms", verdict(warm_ok)),
        (f"  context: mjml-python {mjml_python_version} mjml2html alone",
         f"{median(mrml):8.2f} ms", f"{p90(mrml):8.2f} ms", "", ""),
        (f"cold `newsletter build` process ({cold_runs} runs)",
         f"{cold_med:8.1f} ms", f"{p90(ours):8.1f} ms", "", ""),
        (f"anchor: mjml CLI {mjml_version}, same MJML, cold ({cold_runs} runs)",
         f"{cli_med:8.1f} ms", f"{p90(theirs):8.1f} ms", "", ""),
        ("ratio cold build / mjml CLI", f"{cold_ratio:8.2f} x", "", f"<= {COLD_RATIO_GOAL:g} x", verdict(cold_ok)),
        ("ratio warm build / 10 ms goal", f"{warm_ratio:8.2f} x", "", "< 1 x", verdict(warm_ok)),
    ]
    headers = ("figure", "median", "p90", "goal", "status")
    widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(len(headers))]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rerun = f"cd {shlex.quote(str(ROOT))} && {shlex.quote(sys.executable)} bench/build.py" + " --quick" * args.quick
    print(f"newsletter build benchmark: {ISSUE} with {CONFIG}"
          f" ({len(mjml_source.encode()) / 1024:.1f} KB MJML -> ours {ours_html_kb:.1f} KB HTML,"
          f" mjml CLI {theirs_html_kb:.1f} KB)")
    print(f"machine: {platform.system()} {platform.machine()}, nproc {affinity}"
          f" (cpu_count {os.cpu_count()}), Python {platform.python_version()},"
          f" node {tool_version(['node', '--version'])}, mjml CLI {mjml_version}"
          f", mjml-python {mjml_python_version}")
    print(f"warm: {warmups} warm-up runs, then {warm_runs} timed. cold: one untimed warm-up run of each"
          f" (OS file caches and Jinja's bytecode cache warm), then {cold_runs} of each interleaved A B A B.")
    print()
    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    print()
    print(f"cold `newsletter build`: {shlex.join([sys.executable, '-m', 'newsletter', 'build', ISSUE, '--out', 'TMP'])}")
    print(f"mjml CLI:               {shlex.join(['bench/.node/node_modules/.bin/mjml', 'in.mjml', '-o', 'out.html'])}")
    print(f"rerun: {rerun}")
    if not (warm_ok and cold_ok):
        print("goal missed: " + "; ".join(
            text for ok, text in (
                (warm_ok, f"warm build {warm_med:.2f} ms is not under {WARM_GOAL_MS:g} ms"),
                (cold_ok, f"cold build is {cold_ratio:.2f}x the mjml CLI, over {COLD_RATIO_GOAL:g}x"),
            ) if not ok))
    return 0


if __name__ == "__main__":
    sys.exit(main())
