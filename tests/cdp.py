"""Headless Chromium driven over the Chrome DevTools Protocol, for pages that must really be
clicked (a form submitted, a button pressed), not only laid out.

No Python browser package and no websocket: Chromium's ``--remote-debugging-pipe`` speaks
CDP over two file descriptors (it reads commands on fd 3 and writes on fd 4), each message
JSON ending in a NUL byte. Same binary, flags and fresh profile as tests/browser.py.

    with Browser() as browser:
        browser.open("http://127.0.0.1:8000/subscribe")
        browser.fill("#email", "reader@example.com")
        browser.click("button[type=submit]")    # waits for the page it leads to
        browser.text()                          # the new page's visible text
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import tempfile
import time

from browser import FLAGS, LIGHT, TIMEOUT, chromium_path


# As browser.FLAGS, but the service under test on loopback is reachable: the rule maps IP
# literals too. Every other name still resolves to nothing.
CDP_FLAGS = [f if not f.startswith("--host-resolver-rules") else "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
             for f in FLAGS]


class CdpError(AssertionError):
    pass


class Browser:
    def __init__(self):
        self.binary = chromium_path()

    def __enter__(self):
        self.profile = tempfile.TemporaryDirectory(prefix="cdp-profile-", ignore_cleanup_errors=True)
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()

        def as_fds_3_and_4():  # in the child, before exec: the fds Chromium expects
            high_in, high_out = os.dup(to_chrome), os.dup(from_chrome)  # the pipes may be 3 to 6 themselves
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self.proc = subprocess.Popen(
            [self.binary, *CDP_FLAGS, LIGHT, f"--user-data-dir={self.profile.name}", "--remote-debugging-pipe",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            # close_fds would close 3 and 4 after preexec_fn; the pipes' own fds close at exec
            preexec_fn=as_fds_3_and_4, close_fds=False, start_new_session=True)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf, self._id, self.events = b"", 0, []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=self.session)
        return self

    def __exit__(self, *exc):
        try:
            self.call("Browser.close")
        except Exception:  # already gone: ended below either way
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)
        self.proc.stderr.close()
        self.profile.cleanup()

    # -- the protocol ------------------------------------------------------------------------

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise CdpError(f"Chromium did not answer within {TIMEOUT} s")
            chunk = os.read(self._read, 65536)
            if not chunk:
                raise CdpError("Chromium closed the DevTools pipe")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        command = {"id": self._id, "method": method, "params": params or {}}
        if session:
            command["sessionId"] = session
        os.write(self._write, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            message = self._message(deadline)
            if message.get("id") == self._id:
                if "error" in message:
                    raise CdpError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, event: str) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while True:
            for i, message in enumerate(self.events):
                if message["method"] == event and message.get("sessionId") == self.session:
                    return self.events.pop(i)
            message = self._message(deadline)
            if "method" in message:
                self.events.append(message)

    # -- a page ------------------------------------------------------------------------------

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                           session=self.session)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.events.clear()
        answer = self.call("Page.navigate", {"url": url}, session=self.session)
        if answer.get("errorText"):
            raise CdpError(f"{url}: {answer['errorText']}")
        self.wait_for("Page.loadEventFired")

    def fill(self, selector: str, value: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).value = {json.dumps(value)}")

    def click(self, selector: str) -> None:
        """Click an element that leads to another page (a submit button), and wait for it."""
        self.events.clear()
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")
        self.wait_for("Page.loadEventFired")

    def text(self) -> str:
        return self.evaluate("document.body.innerText")

    def url(self) -> str:
        return self.evaluate("location.href")
