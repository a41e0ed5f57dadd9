"""`newsletter preview` run as a user runs it (its own process, on a free loopback port) and
looked at in real headless Chromium over the DevTools protocol: the page shows the issue,
follows edits of the YAML file and of a template without a reload, shows a broken edit's
file:line and clears it when fixed. And `newsletter snapshot`: three full-height PNGs."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from browser import chromium_path, png_size
from cdp import Browser
from conftest import EXAMPLE, run_cli

WAIT = 30  # seconds: how long a change may take to show before the test gives up (not a timing check)
LEAD_TITLE = "China Prepared to Recognize Taliban Control of Afghanistan"


@pytest.fixture
def server(project):
    """`python -m newsletter preview` in a project folder; yields (url, issue path)."""
    issue = project / "issues" / EXAMPLE.name
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    proc = subprocess.Popen([sys.executable, "-m", "newsletter", "preview", f"issues/{EXAMPLE.name}",
                             "--port", "0"], cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], WAIT)
        line = proc.stdout.readline() if ready else ""
        found = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert found, f"preview printed no URL: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield found[0], issue
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
    assert "Traceback" not in err, err


def wait_until(browser, expression: str, what: str):
    """Evaluate until truthy; the page must get there by itself (no reload is ever sent)."""
    deadline = time.monotonic() + WAIT
    while True:
        value = browser.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            state = browser.evaluate("JSON.stringify({ok: document.body.dataset.ok, v: document.body.dataset.version,"
                                     " problems: document.getElementById('problems').innerText})")
            raise AssertionError(f"the page never showed {what}; it shows {state}")
        time.sleep(0.05)


FRAME_TEXT = "(document.getElementById({!r}).contentDocument.body || {{innerText: ''}}).innerText"


def test_preview_follows_edits(server):
    url, issue = server
    original = issue.read_text(encoding="utf-8")
    with Browser() as browser:
        browser.open(url)
        wait_until(browser, "document.body.dataset.ok === 'true'", "the rendered issue")
        for frame in ("desktop", "phone", "dark"):  # each frame loads its document on its own
            wait_until(browser, FRAME_TEXT.format(frame) + f".includes({LEAD_TITLE!r})", f"the issue in {frame}")
        # the frames are what their captions say: 800 and 375 px wide, the last one in dark mode
        widths = browser.evaluate("['desktop','phone','dark'].map(function (id) {"
                                  " return document.getElementById(id).contentWindow.innerWidth; })")
        assert widths[0] >= 780 and widths[1] <= 375 and widths[2] <= 375, widths
        bodies = browser.evaluate("['phone','dark'].map(function (id) { var d = document.getElementById(id)"
                                  ".contentDocument; return getComputedStyle(d.querySelector('.card') || d.body)"
                                  ".backgroundColor; })")
        assert bodies[0] != bodies[1], f"the dark frame looks like the light one: {bodies}"
        assert "Afghanistan" in browser.evaluate("document.getElementById('text-part').textContent")
        headers = browser.evaluate("document.getElementById('header-block').textContent")
        assert "To: Sample Reader <reader@example.com>" in headers
        assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in headers
        browser.evaluate("window.notReloaded = true")

        # an edit to the YAML file shows up by itself
        issue.write_text(original.replace(LEAD_TITLE, "Edited Lead Title For The Preview"), encoding="utf-8")
        wait_until(browser, FRAME_TEXT.format("desktop") + ".includes('Edited Lead Title For The Preview')",
                   "the edited title")
        assert browser.evaluate("window.notReloaded === true"), "the page was reloaded"

        # a broken edit: the error with its file:line, and the last good rendering stays
        lines = original.splitlines(keepends=True)
        at = next(i for i, text in enumerate(lines) if text.startswith("date:"))
        lines[at] = "date: the thirteenth\n"
        issue.write_text("".join(lines), encoding="utf-8")
        problems = wait_until(browser, "document.body.dataset.ok === 'false' && "
                                       "document.getElementById('problems').innerText", "the problem")
        assert f"{EXAMPLE.name}:{at + 1}" in problems and "date" in problems, problems
        assert browser.evaluate("getComputedStyle(document.getElementById('problems')).display") != "none"
        assert LEAD_TITLE not in browser.evaluate(FRAME_TEXT.format("desktop"))  # the last good one, edited
        # a page opened now shows the same: the problem above the last good rendering
        browser.open(url)
        wait_until(browser, "document.body.dataset.ok === 'false' && " + FRAME_TEXT.format("desktop")
                   + ".includes('Edited Lead Title For The Preview')", "the last good rendering under the problem")
        assert "last good" in browser.evaluate("document.getElementById('problems-title').textContent")
        browser.evaluate("window.notReloaded = true")

        # fixed: the problem goes away
        issue.write_text(original, encoding="utf-8")
        wait_until(browser, "document.body.dataset.ok === 'true' && "
                            "getComputedStyle(document.getElementById('problems')).display === 'none'",
                   "the problem cleared")
        wait_until(browser, FRAME_TEXT.format("desktop") + f".includes({LEAD_TITLE!r})", "the original title")
        assert browser.evaluate("window.notReloaded === true"), "the page was reloaded"


def test_preview_follows_templates_and_settings(server, project):
    url, _ = server
    template = project / "templates" / "email.mjml"
    original = template.read_text(encoding="utf-8")
    with Browser() as browser:
        browser.open(url)
        wait_until(browser, "document.body.dataset.ok === 'true'", "the rendered issue")
        template.write_text(original.replace("</mjml>", "{% if %}\n</mjml>", 1), encoding="utf-8")
        problems = wait_until(browser, "document.body.dataset.ok === 'false' && "
                                       "document.getElementById('problems').innerText", "the template error")
        line = original[:original.index("</mjml>")].count("\n") + 1
        assert f"email.mjml:{line}" in problems, problems
        template.write_text(original, encoding="utf-8")
        wait_until(browser, "document.body.dataset.ok === 'true'", "the fixed template")

        # the settings file is followed too: the list's name is in List-Id
        settings = project / "newsletter.toml"
        text = settings.read_text(encoding="utf-8")
        assert 'name = "The Watchman Brief"' in text
        settings.write_text(text.replace('name = "The Watchman Brief"', 'name = "The Preview Brief"', 1),
                            encoding="utf-8")
        wait_until(browser, "document.getElementById('header-block').textContent"
                            ".includes('List-Id: The Preview Brief <')", "the renamed list")


def test_preview_state_is_json(server):
    """The page's own data: what /state answers is what the page shows."""
    import urllib.request
    url, _ = server
    with urllib.request.urlopen(url + "state", timeout=WAIT) as answer:
        state = json.load(answer)
    assert state["ok"] is True and LEAD_TITLE in state["light"] and "prefers-color-scheme" not in state["dark"]


# --- snapshot ----------------------------------------------------------------------------


def test_snapshot_writes_three_full_height_pngs(project):
    chromium_path()  # skipped without Chromium (failed under CI=true)
    out = project / "shots"
    result = run_cli("snapshot", EXAMPLE.stem, "--out", out, cwd=project)
    assert result.returncode == 0, result.stderr
    sizes = {name: png_size(out / f"{name}.png") for name in ("desktop", "phone", "dark")}
    assert sizes["desktop"][0] == 800 and sizes["phone"][0] == 375 and sizes["dark"][0] == 375, sizes
    assert all(height > 1000 for _, height in sizes.values()), f"not the full page: {sizes}"
    assert sizes["phone"][1] > sizes["desktop"][1], "the phone's narrower column should be taller"
    assert (out / "dark.png").read_bytes() != (out / "phone.png").read_bytes(), "dark mode looks the same as light"
    for name in sizes:
        assert str(out / f"{name}.png") in result.stdout


def test_snapshot_without_chromium_says_how_to_install(project, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    result = run_cli("snapshot", EXAMPLE.stem, cwd=project, env={"PATH": str(empty)})
    assert result.returncode == 2
    assert "apt-get install chromium" in result.stderr


def test_snapshot_of_an_invalid_issue_names_the_line(project):
    chromium_path()
    bad = project / "issues" / "bad.yaml"
    bad.write_text(EXAMPLE.read_text(encoding="utf-8").replace("date:", "date: nope\nold_date:", 1), encoding="utf-8")
    result = run_cli("snapshot", bad, cwd=project)
    assert result.returncode == 1
    assert re.search(r"bad\.yaml:\d+", result.stderr), result.stderr
    assert not (project / "snapshots").exists()
