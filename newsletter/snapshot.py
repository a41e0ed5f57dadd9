"""Screenshots of an issue in Debian's headless Chromium: ``newsletter snapshot`` and the
look tests (tests/browser.py calls this module) share this code.

No Python browser package: each run is one ``chromium --headless`` process with a fresh
profile, and the page is loaded from a file:// URL. Two things about headless Chromium
shape this module (measured with Debian's Chromium 156):

* ``--window-size`` does not set the viewport below 500 px: ``--window-size=375,800``
  still lays the page out 500 px wide. So the page is loaded in an ``<iframe>`` of exactly
  the width wanted; the iframe is the viewport (``innerWidth``, media queries and
  ``scrollWidth`` inside it are the phone's). A measuring script is added to a copy of the
  page and called by the wrapper page on its load event; ``--allow-file-access-from-files``
  lets the wrapper call into the frame. The wrapper writes the result as JSON into
  ``<pre id="measure">`` and ``--dump-dom`` prints it.
* ``--screenshot`` captures the top-left ``--window-size`` rectangle of that layout, so a
  screenshot is the same wrapper with the iframe at (0, 0) and exactly the window's size.
  A full-height screenshot therefore measures the page's height first.

Dark mode is ``--blink-settings=preferredColorScheme=0`` (1 is light; both are passed
explicitly so the host's theme cannot leak in). Nothing is loaded from the network: every
host name resolves to nothing.
"""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import NewsletterError

TIMEOUT = 60  # seconds, per Chromium run
NAMES = ("chromium", "chromium-browser")
INSTALL_HINT = "install Debian's package: apt-get install chromium"

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--allow-file-access-from-files",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]
LIGHT = "--blink-settings=preferredColorScheme=1"
DARK = "--blink-settings=preferredColorScheme=0"

DESKTOP = 800
PHONE = 375


class BrowserError(NewsletterError):
    """Chromium is missing, failed or hung."""


def find_chromium() -> str | None:
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    found = find_chromium()
    if not found:
        raise BrowserError(f"headless Chromium is needed and none of {', '.join(NAMES)} is on PATH; {INSTALL_HINT}")
    return found


def run_chromium(binary: str, args: list[str], *, dark: bool = False) -> str:
    """Run one headless Chromium with a fresh profile; returns its stdout. Chromium runs in
    its own process group, so a hung run is ended whole (renderers too) after TIMEOUT."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True) as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", DARK if dark else LIGHT, *args]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise BrowserError(f"Chromium did not finish within {TIMEOUT} s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        raise BrowserError(f"Chromium exited with {proc.returncode}: {' '.join(cmd)}\n{err[-3000:]}")
    return out


# --- measuring and screenshots ------------------------------------------------------------

# The least a screenshot needs: how tall the page is at the frame's width.
HEIGHT_JS = """
window.__measure = function () {
  return {scrollHeight: Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)};
};
"""

MEASURE_WRAPPER = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta name="color-scheme" content="light dark">
<style>html, body {{ margin: 0; }} iframe {{ display: block; border: 0; }}</style></head>
<body>{frames}<pre id="measure"></pre>
<script>
window.addEventListener("load", function () {{
  var out = {{}};
  document.querySelectorAll("iframe").forEach(function (f) {{
    try {{ out[f.name] = f.contentWindow.__measure(); }}
    catch (e) {{ out[f.name] = {{error: String(e)}}; }}
  }});
  document.getElementById("measure").textContent = JSON.stringify(out);
}});
</script></body></html>
"""

SHOT_WRAPPER = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta name="color-scheme" content="light dark">
<style>html, body {{ margin: 0; overflow: hidden; }} iframe {{ display: block; border: 0; }}</style></head>
<body><iframe src="{src}" style="width: {width}px; height: {height}px"></iframe></body></html>
"""

_RESULT = re.compile(r'<pre id="measure">(.*?)</pre>', re.S)


@dataclass(frozen=True)
class Page:
    """One page to measure: its HTML, and the viewport (iframe) size to lay it out in."""
    html: str
    width: int
    height: int = 800


def with_script(page_html: str, script: str) -> str:
    """A copy of the page with `script` run at the end of <body>."""
    tag = f"<script>{script}</script>"
    at = page_html.lower().rfind("</body>")
    return page_html + tag if at < 0 else page_html[:at] + tag + page_html[at:]


def measure(binary: str, pages: dict[str, Page], workdir: Path, *, script: str = HEIGHT_JS,
            dark: bool = False) -> dict[str, dict]:
    """Lay out each page in its own viewport in one Chromium run; returns what `script`'s
    ``window.__measure()`` returned, per page name."""
    run = Path(tempfile.mkdtemp(prefix="measure-", dir=workdir))
    frames = []
    for name, page in pages.items():
        (run / f"{name}.html").write_text(with_script(page.html, script), encoding="utf-8")
        frames.append(f'<iframe name="{name}" src="{name}.html" '
                      f'style="width: {page.width}px; height: {page.height}px"></iframe>')
    wrapper = run / "measure.html"
    wrapper.write_text(MEASURE_WRAPPER.format(frames="\n".join(frames)), encoding="utf-8")
    window = max(page.width for page in pages.values())
    out = run_chromium(binary, [f"--window-size={window},800", "--dump-dom", wrapper.as_uri()], dark=dark)
    found = _RESULT.search(out)
    if not found or not found.group(1).strip():
        raise BrowserError(f"no measurement in Chromium's --dump-dom output:\n{out[:2000]}")
    results = json.loads(html_lib.unescape(found.group(1)))
    for name, result in results.items():
        if "error" in result:
            raise BrowserError(f"measuring {name!r} failed in the browser: {result['error']}")
    return results


def screenshot(binary: str, page_html: str, path: Path, width: int, height: int, workdir: Path,
               *, dark: bool = False) -> Path:
    """A width x height PNG of the page laid out in a width-wide viewport."""
    run = Path(tempfile.mkdtemp(prefix="shot-", dir=workdir))
    (run / "page.html").write_text(page_html, encoding="utf-8")
    wrapper = run / "shot.html"
    wrapper.write_text(SHOT_WRAPPER.format(src="page.html", width=width, height=height), encoding="utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    run_chromium(binary, [f"--window-size={width},{height}", f"--screenshot={path}", wrapper.as_uri()], dark=dark)
    if not path.is_file():
        raise BrowserError(f"Chromium wrote no screenshot to {path}")
    return path


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk; ValueError if it is not a PNG."""
    head = Path(path).read_bytes()[:24]
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG (starts {head[:16]!r})")
    return struct.unpack(">II", head[16:24])


# --- the command ----------------------------------------------------------------------------

# name -> (width, dark): what an author or reviewer looks at without a mail client
SHOTS = {"desktop": (DESKTOP, False), "phone": (PHONE, False), "dark": (PHONE, True)}


def snapshot_html(page_html: str, out_dir: Path, binary: str | None = None) -> dict[str, Path]:
    """desktop.png, phone.png and dark.png of the page in out_dir, each the page's full height."""
    binary = binary or require_chromium()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from .errors import OutputError
        raise OutputError(f"cannot create {out_dir}: {exc.strerror}") from exc
    with tempfile.TemporaryDirectory(prefix="snapshot-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        # heights: light pages in one run, the dark one in another (dark is a browser-wide flag)
        light = measure(binary, {n: Page(page_html, w) for n, (w, d) in SHOTS.items() if not d}, work)
        dark = measure(binary, {n: Page(page_html, w) for n, (w, d) in SHOTS.items() if d}, work, dark=True)
        heights = {**light, **dark}
        return {name: screenshot(binary, page_html, out_dir / f"{name}.png", width,
                                 max(1, int(heights[name]["scrollHeight"])), work, dark=is_dark)
                for name, (width, is_dark) in SHOTS.items()}


def snapshot_issue(issue_path: str | Path, config, out_dir: Path | None = None) -> dict[str, Path]:
    """Render the issue as a sample recipient gets it and screenshot it; IssueError with
    every problem when the file is invalid."""
    from .preview import sample

    binary = require_chromium()  # before rendering: a missing browser is the first thing to say
    result = sample(issue_path, config)
    if out_dir is None:
        out_dir = Path("snapshots") / result.stem
    return snapshot_html(result.html, out_dir, binary)
