"""Headless Chromium for the look tests (test_look.py): the browser code itself lives in
newsletter/snapshot.py (``newsletter snapshot`` takes its screenshots the same way); this
module adds what only the tests need: skipping (or, under CI=true, failing) without Chromium,
and MEASURE_JS, which reads sizes, fonts and colours out of the laid-out page.

See newsletter/snapshot.py for how the viewport and dark mode are set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from newsletter import snapshot
from newsletter.snapshot import (DARK, FLAGS, LIGHT, NAMES, TIMEOUT, Page, png_size,  # noqa: F401 (re-exported)
                                 run_chromium, screenshot, with_script)


def chromium_path() -> str:
    """The Chromium binary; skips the caller when there is none, but fails under CI=true
    (CI must run the look tests, never skip them)."""
    found = snapshot.find_chromium()
    if found:
        return found
    reason = f"headless Chromium is needed for the look tests and none of {', '.join(NAMES)} is on PATH"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the look tests must not be skipped)", pytrace=False)
    pytest.skip(reason)


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


def measure(binary: str, pages: dict[str, Page], workdir: Path, *, dark: bool = False) -> dict[str, dict]:
    """Lay out each page in its own viewport in one Chromium run; returns MEASURE_JS's result
    per page name."""
    return snapshot.measure(binary, pages, workdir, script=MEASURE_JS, dark=dark)


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
