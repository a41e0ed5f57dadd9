"""How long from saving the issue file to the preview page showing the change, measured in
headless Chromium: `python bench/preview.py [--edits 20]` from the repo root.

`newsletter preview` runs as a user runs it (its own process, a free loopback port) on a copy
of the example project; Chromium (tests/cdp.py, over the DevTools pipe) has the page open. For
each edit the lead title gets a new word; a timer inside the page (every 2 ms) notes the
moment the desktop frame shows it, on the same clock as the moment Python wrote the file.
Goal: median under 300 ms.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # cdp.py, browser.py

from cdp import Browser  # noqa: E402

from common import note  # noqa: E402

ISSUE = "2021-08-13-china-taliban.yaml"
TITLE = "China Prepared to Recognize Taliban Control of Afghanistan"

WATCH = """(function (marker) {
  window.__shownAt = 0;
  var timer = setInterval(function () {
    var doc = document.getElementById("desktop").contentDocument;
    if (doc && doc.body && doc.body.innerText.indexOf(marker) >= 0) {
      window.__shownAt = performance.timeOrigin + performance.now();
      clearInterval(timer);
    }
  }, 2);
})(%r)"""


def wait(browser, expression: str, limit: float = 30.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = browser.evaluate(expression)
        if value:
            return value
        time.sleep(0.01)
    raise SystemExit(f"the page never showed it: {expression}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-preview-") as tmp:
        project = Path(tmp)
        shutil.copy(ROOT / "newsletter.toml", project)
        shutil.copytree(ROOT / "templates", project / "templates")
        (project / "issues").mkdir()
        issue = project / "issues" / ISSUE
        original = (ROOT / "issues" / ISSUE).read_text(encoding="utf-8")
        issue.write_text(original, encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        proc = subprocess.Popen([sys.executable, "-m", "newsletter", "preview", f"issues/{ISSUE}", "--port", "0"],
                                cwd=project, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            select.select([proc.stdout], [], [], 30)
            url = re.search(r"http://\S+/", proc.stdout.readline())[0]
            note(f"preview at {url}")
            times = []
            with Browser() as browser:
                browser.open(url)
                wait(browser, "document.body.dataset.ok === 'true'")
                for i in range(args.edits + 1):  # the first edit warms up and is not counted
                    marker = f"Bench edit {i} {time.time_ns()}"
                    browser.evaluate(WATCH % marker)
                    time.sleep(0.3)  # let the watcher settle between edits, as between an author's saves
                    saved = time.time() * 1000
                    issue.write_text(original.replace(TITLE, marker), encoding="utf-8")
                    shown = wait(browser, "window.__shownAt")
                    if i:
                        times.append(shown - saved)
                        note(f"edit {i:2}: {shown - saved:.0f} ms")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    print(f"saved -> shown in the page, {len(times)} edits: median {statistics.median(times):.0f} ms, "
          f"min {min(times):.0f} ms, max {max(times):.0f} ms (goal < 300 ms)")


if __name__ == "__main__":
    main()
