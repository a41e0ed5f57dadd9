"""Headless Chromium, driven from the command line, for the look tests (test_look.py).

No Python browser package: each run is one ``chromium --headless`` process with a fresh
profile, and the page under test is loaded from a file:// URL.

Two things about headless Chromium shape this module (measured with Debian's
Chromium 156):

* ``--window-size`` does not set the viewport below 500 px: ``--window-size=375,800``
  still lays the page out 500 px wide (``innerWidth`` is 500). So the page under test is
  loaded in an ``<iframe>`` of exactly the width wanted; the iframe is the viewport
  (``innerWidth``, media queries and ``scrollWidth`` inside it are the phone's). The
  measuring script is added to a copy of the page and called by the wrapper page on
  its load event; ``--allow-file-access-from-files`` lets the wrapper call into the
  frame (two file:// pages are otherwise different origins). The wrapper writes the
  result as JSON into ``<pre id="measure">`` and ``--dump-dom`` prints it.
* ``--screenshot`` captures the top-left ``--window-size`` rectangle of that layout,
  so a screenshot is the same wrapper with the iframe at (0, 0) and exactly the
  window's size: the PNG is the iframe, whatever the layout width around it.

Dark mode is ``--blink-settings=preferredColorScheme=0`` (1 is light; both are passed
explicitly so the host's theme cannot leak in). ``--force-dark-mode`` works too. Either
way the measurement reports ``matchMedia('(prefers-color-scheme: dark)').matches`` from
inside the frame, and the tests assert it.

Nothing is loaded from the network: every host name resolves to nothing.
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

import pytest

TIMEOUT = 60  # seconds, per Chromium run
NAMES = ("chromium", "chromium-browser")

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


def chromium_path() -> str:
    """The Chromium binary; skips the caller when there is none, but fails under CI=true
    (CI must run the look tests, never skip them)."""
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    reason = f"headless Chromium is needed for the look tests and none of {', '.join(NAMES)} is on PATH"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the look tests must not be skipped)", pytrace=False)
    pytest.skip(reason)


def run_chromium(binary: str, args: list[str], *, dark: bool = False) -> str:
    """Run one headless Chromium with a fresh profile; returns its stdout. Chromium runs in
    its own process group, so a hung run is ended whole (renderers too) after TIMEOUT."""
    with tempfile.TemporaryDirectory(prefix="look-profile-", ignore_cleanup_errors=True) as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", DARK if dark else LIGHT, *args]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"Chromium did not finish within {TIMEOUT} s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        raise AssertionError(f"Chromium exited with {proc.returncode}: {' '.join(cmd)}\n{err[-3000:]}")
    return out


# --- measuring ------------------------------------------------------------------------

# Added to a copy of the page; the wrapper page calls window.__measure() on load.
MEASURE_JS = r"""
window.__measure = function () {
  "use strict";
  var root = document.documentElement, body = document.body;
  var dark = matchMedia("(prefers-color-scheme: dark)").matches;

  function parse(c) {
    var m = /^rgba?\(([^)]*)\)$/.exec(c || "");
    if (!m) return null;
    var p = m[1].split(/[\s,\/]+/).filter(Boolean).map(parseFloat);
    return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
  }
  function over(top, under) {
    var a = top[3];
    return [0, 1, 2].map(function (i) { return top[i] * a + under[i] * (1 - a); });
  }
  // The colour actually behind an element: its own and its ancestors' backgrounds,
  // composited down to the first opaque one (white canvas if none is).
  function background(el) {
    var layers = [];
    for (var e = el; e; e = e.parentElement) {
      var c = parse(getComputedStyle(e).backgroundColor);
      if (c && c[3] > 0) { layers.push(c); if (c[3] >= 1) break; }
    }
    var rgb = [255, 255, 255];
    for (var i = layers.length - 1; i >= 0; i--) rgb = over(layers[i], rgb);
    return rgb;
  }
  function box(r) {
    return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width, height: r.height};
  }
  function visible(el) {
    return el.getClientRects().length > 0 &&
      el.checkVisibility({opacityProperty: true, visibilityProperty: true});
  }
  function describe(el) {
    var cls = typeof el.className === "string" && el.className ? "." + el.className.trim().split(/\s+/).join(".") : "";
    return el.tagName.toLowerCase() + cls;
  }

  var cardEls = Array.prototype.slice.call(document.querySelectorAll(".card"));
  var cards = cardEls.map(function (el) {
    var b = box(el.getBoundingClientRect());
    b.background = background(el);
    b.visible = visible(el);
    return b;
  });

  // Every rendered element that directly holds non-whitespace text.
  var texts = [], seen = new Set();
  var walker = document.createTreeWalker(body, NodeFilter.SHOW_TEXT);
  for (var n = walker.nextNode(); n; n = walker.nextNode()) {
    var el = n.parentElement;
    if (!el || seen.has(el) || !/\S/.test(n.nodeValue)) continue;
    if (/^(SCRIPT|STYLE|NOSCRIPT|TEMPLATE)$/.test(el.tagName) || !visible(el)) continue;
    var range = document.createRange();
    range.selectNodeContents(n);
    var shown = Array.prototype.some.call(range.getClientRects(), function (r) { return r.width > 0 && r.height > 0; });
    if (!shown) continue;
    seen.add(el);
    var cs = getComputedStyle(el), bg = background(el), fg = parse(cs.color);
    texts.push({
      text: (el.innerText || el.textContent).replace(/\s+/g, " ").trim().slice(0, 80),
      element: describe(el),
      fontSize: parseFloat(cs.fontSize),
      fontWeight: parseInt(cs.fontWeight, 10),
      color: fg ? over(fg, bg) : null,
      rawColor: cs.color,
      background: bg,
      card: cardEls.indexOf(el.closest(".card")),
      box: box(el.getBoundingClientRect())
    });
  }

  // Visible elements that stick out of the viewport sideways (for failure messages).
  var overflowing = [];
  Array.prototype.forEach.call(body.querySelectorAll("*"), function (el) {
    if (overflowing.length >= 10 || !visible(el)) return;
    var r = el.getBoundingClientRect();
    if (r.width > 0 && (r.right > innerWidth + 0.5 || r.left < -0.5)) {
      overflowing.push({element: describe(el), left: r.left, right: r.right, width: r.width});
    }
  });

  return {
    innerWidth: innerWidth,
    innerHeight: innerHeight,
    clientWidth: root.clientWidth,
    scrollWidth: root.scrollWidth,
    bodyScrollWidth: body.scrollWidth,
    scrollHeight: Math.max(root.scrollHeight, body.scrollHeight),
    dark: dark,
    narrow: matchMedia("(max-width: 480px)").matches,
    cards: cards,
    texts: texts,
    overflowing: overflowing
  };
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


def measure(binary: str, pages: dict[str, Page], workdir: Path, *, dark: bool = False) -> dict[str, dict]:
    """Lay out each page in its own viewport in one Chromium run; returns MEASURE_JS's result
    per page name."""
    run = Path(tempfile.mkdtemp(prefix="measure-", dir=workdir))
    frames = []
    for name, page in pages.items():
        (run / f"{name}.html").write_text(with_script(page.html, MEASURE_JS), encoding="utf-8")
        frames.append(f'<iframe name="{name}" src="{name}.html" '
                      f'style="width: {page.width}px; height: {page.height}px"></iframe>')
    wrapper = run / "measure.html"
    wrapper.write_text(MEASURE_WRAPPER.format(frames="\n".join(frames)), encoding="utf-8")
    window = max(page.width for page in pages.values())
    out = run_chromium(binary, [f"--window-size={window},800", "--dump-dom", wrapper.as_uri()], dark=dark)
    found = _RESULT.search(out)
    if not found or not found.group(1).strip():
        raise AssertionError(f"no measurement in Chromium's --dump-dom output:\n{out[:2000]}")
    results = json.loads(html_lib.unescape(found.group(1)))
    for name, result in results.items():
        if "error" in result:
            raise AssertionError(f"measuring {name!r} failed in the browser: {result['error']}")
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
    return path


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk; AssertionError if it is not a PNG."""
    head = path.read_bytes()[:24]
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise AssertionError(f"{path} is not a PNG (starts {head[:16]!r})")
    return struct.unpack(">II", head[16:24])


# --- colour -------------------------------------------------------------------------


def luminance(rgb) -> float:
    """WCAG relative luminance of an (r, g, b) in 0..255."""
    def channel(c: float) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a, b) -> float:
    """WCAG contrast ratio of two (r, g, b) colours."""
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)
