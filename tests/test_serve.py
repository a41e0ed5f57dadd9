"""`newsletter serve` run as a user runs it (its own process, uvicorn on a free loopback
port), spoken to over real HTTP (httpx): one-click unsubscribe (RFC 8058), its page and
button (clicked in headless Chromium), bad tokens and bodies, the body limit, the access
log, and a send running at the same time on the same SQLite store."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from browser import FLAGS, chromium_path
from conftest import EXAMPLE, ROOT, addresses, config_for, run_cli, subscribe
from newsletter.recipients import Recipient
from newsletter.store import Store
from newsletter.tokens import Signer
from smtp_server import Handler, Server, free_port, make_certificate
from test_send import settings_env

FORM = "application/x-www-form-urlencoded"
ONE_CLICK = b"List-Unsubscribe=One-Click"


class Service:
    """`python -m newsletter serve` on a free port; stderr (the access log) kept in a file."""

    def __init__(self, env: dict, workdir: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "serve.stderr"
        outside = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "newsletter", "serve", "--host", "127.0.0.1",
                                      "--port", str(self.port)], cwd=ROOT, env={**outside, **env},
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"serve did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)
        self.client = httpx.Client(base_url=self.base, follow_redirects=False, timeout=60)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.log_path.read_text()

    def unsubscribe(self, token: str, **kwargs) -> httpx.Response:
        if not {"files", "content", "json", "data"} & set(kwargs):
            kwargs.update(content=ONE_CLICK, headers={"content-type": FORM, **kwargs.get("headers", {})})
        return self.client.post(f"/unsubscribe/{token}", **kwargs)


def signer_for(config) -> Signer:
    return Signer(config.send.secret.encode("utf-8"), config.publication.list_id)


def status_of(config, email: str) -> tuple[str, str]:
    with Store(config.store.path) as store:
        return store.db.execute("SELECT status, changed_how FROM subscribers WHERE email = ?", (email,)).fetchone()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A store of 40 subscribers, each with a ledger row (as after a send), and the service on it."""
    tmp = tmp_path_factory.mktemp("serve")
    env = settings_env(tmp, 1, serve_max_body=1024)
    config = config_for(env)
    subscribe(config, addresses(40))
    signer = signer_for(config)
    with Store(config.store.path) as store:
        store.enqueue_subscribers("2021-08-13-china-taliban", signer.recipient_key)
        # and one sent to from a list file (`send --to`): a ledger row, but no subscriber
        store.enqueue("2021-08-13-china-taliban", [Recipient("listed@example.com")], signer.recipient_key)
    service = Service(env, tmp)
    tokens = {a: signer.token(signer.recipient_key(a)) for a in addresses(40) + ["listed@example.com"]}
    yield service, config, tokens
    service.stop()


def assert_plain_success(response: httpx.Response) -> None:
    """RFC 8058: 2xx, and nothing the mailbox provider's POST would have to follow or keep."""
    assert 200 <= response.status_code < 300, response.text
    assert "location" not in response.headers and "set-cookie" not in response.headers
    assert "You are unsubscribed" in response.text


@pytest.mark.parametrize("kind", ["urlencoded", "multipart"])
def test_the_one_click_post_unsubscribes_at_once(served, kind):
    service, config, tokens = served
    reader = "r1@example.com" if kind == "urlencoded" else "r2@example.com"
    assert status_of(config, reader)[0] == "subscribed"
    if kind == "urlencoded":
        response = service.unsubscribe(tokens[reader])
    else:  # as Gmail may send it
        response = service.unsubscribe(tokens[reader], files={"List-Unsubscribe": (None, "One-Click")})
        assert response.request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert_plain_success(response)
    assert status_of(config, reader) == ("unsubscribed", "one-click")
    with Store(config.store.path) as store:
        assert reader in store.blocked([reader])
    again = service.unsubscribe(tokens[reader])  # a second click, or the provider retrying
    assert_plain_success(again)
    assert status_of(config, reader) == ("unsubscribed", "one-click")


def test_a_reader_sent_to_from_a_list_is_kept_as_unsubscribed(served):
    service, config, tokens = served
    assert status_of(config, "listed@example.com") is None
    assert_plain_success(service.unsubscribe(tokens["listed@example.com"]))
    assert status_of(config, "listed@example.com") == ("unsubscribed", "one-click")
    with Store(config.store.path) as store:  # what the next `send --to` checks
        assert store.blocked(["listed@example.com"]) == {"listed@example.com"}


def test_a_token_in_the_query_string(tmp_path):
    """unsubscribe_url = https://…/u?t={token}: the route is /u, the token read from t."""
    env = settings_env(tmp_path, 1, publication_unsubscribe_url="https://news.example.com/u?t={token}")
    config = config_for(env)
    subscribe(config, ["q@example.com"])
    signer = signer_for(config)
    with Store(config.store.path) as store:
        store.enqueue_subscribers("2021-08-13-china-taliban", signer.recipient_key)
    service = Service(env, tmp_path)
    try:
        token = signer.token(signer.recipient_key("q@example.com"))
        assert service.client.post("/u", content=ONE_CLICK, headers={"content-type": FORM}).status_code == 400
        assert service.client.get("/u", params={"t": token}).status_code == 200
        assert status_of(config, "q@example.com")[0] == "subscribed"
        response = service.client.post("/u", params={"t": token}, content=ONE_CLICK, headers={"content-type": FORM})
        assert_plain_success(response)
        assert status_of(config, "q@example.com") == ("unsubscribed", "one-click")
    finally:
        log = service.stop()
    assert token not in log and "/u" in log


def test_a_get_shows_a_button_and_never_unsubscribes(served):
    service, config, tokens = served
    reader = "r3@example.com"
    for _ in range(3):  # a link scanner, a preview, the reader
        response = service.client.get(f"/unsubscribe/{tokens[reader]}")
        assert response.status_code == 200
    assert status_of(config, reader)[0] == "subscribed"
    page = response.text
    assert config.publication.name in page and reader not in page
    assert '<form method="post">' in page
    assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in page
    assert response.headers["referrer-policy"] == "no-referrer" and "set-cookie" not in response.headers
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


def test_the_pages_button_unsubscribes_in_a_browser(served):
    """The page as a reader sees it, in headless Chromium: press the button, land on the
    confirmation at the same URL (no redirect), and the store says unsubscribed."""
    service, config, tokens = served
    reader = "r4@example.com"
    url = f"{service.base}/unsubscribe/{tokens[reader]}"
    with Chromium(chromium_path()) as browser:
        browser.open(url)
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('unsubscribe')")
        assert status_of(config, reader)[0] == "subscribed"  # the browser's GET changed nothing
        browser.evaluate("document.getElementById('unsubscribe').click()")
        done = browser.wait_for("document.getElementById('done') && document.getElementById('done').textContent")
        assert done == "You are unsubscribed"
        assert browser.evaluate("location.href") == url
    assert status_of(config, reader) == ("unsubscribed", "one-click")


def test_bad_tokens_get_400_and_change_nothing(served):
    service, config, tokens = served
    reader = "r5@example.com"
    good = tokens[reader]
    rkey = signer_for(config).recipient_key(reader)
    middle = len(good) // 2
    bad = {
        "forged": Signer(b"not the secret", config.publication.list_id).token(rkey),
        "truncated": good[:-4],
        "altered": good[:middle] + ("A" if good[middle] != "A" else "B") + good[middle + 1:],
        "another list": Signer(config.send.secret.encode(), "other.example.com").token(rkey),
        "padded": good + "=",
        "empty-looking": "x",
    }
    for what, token in bad.items():
        for response in (service.client.get(f"/unsubscribe/{token}"), service.unsubscribe(token)):
            assert response.status_code == 400, what
            assert "This unsubscribe link is not valid" in response.text, what
    assert status_of(config, reader)[0] == "subscribed"


def test_a_genuine_token_the_store_does_not_know_gets_404(served):
    service, config, _tokens = served
    signer = signer_for(config)
    token = signer.token(signer.recipient_key("stranger@example.com"))
    assert service.unsubscribe(token).status_code == 404
    assert service.client.get(f"/unsubscribe/{token}").status_code == 404
    assert status_of(config, "stranger@example.com") is None


def test_bodies_that_are_not_a_one_click_post_get_4xx(served):
    service, config, tokens = served
    reader = "r6@example.com"
    token = tokens[reader]
    cases = {
        "text/plain": (415, dict(content=ONE_CLICK, headers={"content-type": "text/plain"})),
        "json": (415, dict(json={"List-Unsubscribe": "One-Click"})),
        "no content type": (415, dict(content=ONE_CLICK)),
        "empty body": (400, dict(content=b"", headers={"content-type": FORM})),
        "wrong value": (400, dict(content=b"List-Unsubscribe=Yes", headers={"content-type": FORM})),
        "a file in it": (400, dict(files={"List-Unsubscribe": ("x.txt", b"One-Click", "text/plain")})),
    }
    for what, (status, kwargs) in cases.items():
        response = service.unsubscribe(token, **kwargs)
        assert response.status_code == status, (what, response.text)
        assert "Traceback" not in response.text
    assert status_of(config, reader)[0] == "subscribed"


def test_bodies_over_the_limit_get_413(served):
    service, config, tokens = served
    reader = "r7@example.com"
    big = ONE_CLICK + b"&pad=" + b"x" * 2000  # max_body is 1024
    response = service.unsubscribe(tokens[reader], content=big, headers={"content-type": FORM})
    assert response.status_code == 413

    def chunks():  # no Content-Length: the limit is found while reading
        yield ONE_CLICK
        for _ in range(20):
            yield b"&pad=" + b"x" * 100

    response = service.unsubscribe(tokens[reader], content=chunks(), headers={"content-type": FORM})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert status_of(config, reader)[0] == "subscribed"
    within = ONE_CLICK + b"&pad=" + b"x" * 900
    assert_plain_success(service.unsubscribe(tokens[reader], content=within, headers={"content-type": FORM}))


def test_health(served):
    service, _config, _tokens = served
    response = service.client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_serve_refuses_to_start_without_the_secret(tmp_path):
    env = settings_env(tmp_path, 1)
    del env["NEWSLETTER_SECRET"]
    result = run_cli("serve", "--port", free_port(), env=env)
    assert result.returncode == 2
    assert "NEWSLETTER_SECRET is not set" in result.stderr


def test_the_access_log_holds_no_token_and_no_address(served):
    service, config, tokens = served
    service.client.get("/no/such/r9@example.com")
    service.client.get(f"/u/{tokens['r9@example.com']}")
    service.client.get("/health?email=r9@example.com")
    deadline = time.monotonic() + 30  # each line is written just after its response is sent
    while '"/health"' not in (log := service.log_path.read_text()).rsplit('"/u/', 1)[-1]:
        assert time.monotonic() < deadline, log
        time.sleep(0.05)
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert lines, log
    for line in lines:
        assert set(line) == {"method", "path", "status", "ms"}, line
    unsubscribes = [line for line in lines if line["path"].startswith("/unsubscribe/")]
    assert unsubscribes and all(line["path"] == "/unsubscribe/…" for line in unsubscribes)
    assert {"method": "GET", "path": "/no/…/…", "status": 404} in [
        {k: v for k, v in line.items() if k != "ms"} for line in lines]
    assert "@" not in log
    for token in tokens.values():
        assert token not in log and token[:16] not in log


# -- send and serve at once on one store -----------------------------------------------------

class GatedHandler(Handler):
    """Holds the first DATA until the test opens the gate: by then the send has read its
    first batch of the ledger, and the rest is still to be read."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = threading.Event()
        self.gate = threading.Event()

    async def handle_DATA(self, server, session, envelope):
        import asyncio
        self.first.set()
        while not self.gate.is_set():
            await asyncio.sleep(0.01)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


def test_readers_who_unsubscribe_during_a_send_are_skipped(tmp_path, cert):
    handler = GatedHandler(delay=0.005)
    everyone = addresses(300)
    with Server(handler, tls=cert) as smtp:
        env = settings_env(tmp_path, smtp.port, cert, send_batch_size=20, smtp_connections=2)
        config = config_for(env)
        subscribe(config, everyone)
        service = Service(env, tmp_path)
        outside = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        send = subprocess.Popen([sys.executable, "-m", "newsletter", "send", str(EXAMPLE)], cwd=ROOT,
                                env={**outside, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert handler.first.wait(60), send.communicate(timeout=5)
            # The send now holds its first message; its first batch has been read and checked.
            with Store(config.store.path) as store:
                order = [e for (e,) in store.db.execute("SELECT email FROM deliveries ORDER BY id")]
            assert sorted(order) == sorted(everyone)
            signer = signer_for(config)
            token = {a: signer.token(signer.recipient_key(a)) for a in everyone}
            already_read = order[2:6]  # in the first batch: on their way, as the page says
            not_yet_read = order[150:200:2]  # far past what a send reads ahead
            for reader in already_read + not_yet_read:
                assert_plain_success(service.unsubscribe(token[reader]))
            handler.gate.set()
            # While the send runs: more readers leave, each POST committed while the send commits.
            racing = order[200:300:3]
            for reader in racing:
                assert_plain_success(service.unsubscribe(token[reader]))
            out, err = send.communicate(timeout=300)
        finally:
            handler.gate.set()
            if send.poll() is None:
                send.kill()
                send.communicate()
            log = service.stop()
    assert send.returncode == 0, out + err
    assert "locked" not in (out + err + log).lower() and "Traceback" not in err + log

    delivered = handler.delivered()
    with Store(config.store.path) as store:
        ledger = {e: (s, r) for e, s, r in store.db.execute("SELECT email, state, reply FROM deliveries")}
        statuses = dict(store.db.execute("SELECT email, status FROM subscribers"))
    left = set(already_read + not_yet_read + racing)
    assert all(statuses[reader] == "unsubscribed" for reader in left)
    for reader in not_yet_read:  # unsubscribed before their batch was read: never sent to
        assert reader not in delivered, reader
        assert ledger[reader] == ("skipped", "unsubscribed or suppressed before sending"), reader
    for reader in already_read:  # read and checked before they left: this one issue still arrives
        assert delivered[reader] == 1 and ledger[reader][0] == "sent"
    for reader in racing:  # each either skipped or sent once, never both, never lost
        assert (ledger[reader][0], delivered.get(reader, 0)) in {("skipped", 0), ("sent", 1)}, reader
    for reader in set(everyone) - left:
        assert delivered[reader] == 1 and ledger[reader][0] == "sent", reader
    assert all(n == 1 for n in delivered.values())
    assert sum(state == "skipped" for state, _ in ledger.values()) >= len(not_yet_read)


# -- a small headless Chromium driver: the DevTools protocol over a pipe ----------------------

class Chromium:
    """Chromium with --remote-debugging-pipe: JSON messages ending in NUL, commands on the
    child's fd 3, answers on its fd 4 (no websocket library needed)."""

    TIMEOUT = 60

    def __init__(self, binary: str):
        self.binary = binary

    def __enter__(self):
        self.profile = tempfile.mkdtemp(prefix="serve-profile-")
        # Both child ends above fd 10, so that moving them to 3 and 4 cannot clobber either.
        to_child, self.commands = os.pipe()
        self.answers, from_child = os.pipe()
        for fd in (to_child, from_child):
            high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
            os.close(fd)
            to_child, from_child = (high, from_child) if fd == to_child else (to_child, high)
        cmd = ["bash", "-c", f'exec "$@" 3<&{to_child} 4>&{from_child} {to_child}<&- {from_child}>&-', "bash",
               self.binary, *[f for f in FLAGS if not f.startswith("--host-resolver")],
               f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(cmd, pass_fds=(to_child, from_child), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_child)
        os.close(from_child)
        self.buffer, self.next_id, self.session = b"", 0, None
        return self

    def __exit__(self, *exc):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        os.close(self.commands)
        os.close(self.answers)
        shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method: str, session: str | None = None, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.TIMEOUT
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self.next_id:
                    if "error" in answer:
                        raise AssertionError(f"{method}: {answer['error']}")
                    return answer["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.answers], [], [], left)[0]:
                raise AssertionError(f"Chromium did not answer {method} within {self.TIMEOUT} s")
            chunk = os.read(self.answers, 65536)
            if not chunk:
                raise AssertionError(f"Chromium closed the pipe during {method}")
            self.buffer += chunk

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str):
        """Poll until the expression is truthy (a page load or a form post takes its time)."""
        deadline = time.monotonic() + self.TIMEOUT
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except AssertionError:  # the page was between documents
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"never true within {self.TIMEOUT} s: {expression}")


def test_a_transaction_inside_another_joins_it(tmp_path):
    """The service commits a round of unsubscribes at once: record_event's own transaction
    joins the round's, and a round rolled back leaves nothing behind."""
    config = config_for(settings_env(tmp_path, 1))
    subscribe(config, ["a@example.com", "b@example.com"])
    from newsletter.outcome import UNSUBSCRIBE, Event
    with Store(config.store.path) as store:
        with pytest.raises(RuntimeError):
            with store.transaction():
                assert store.record_event(Event(UNSUBSCRIBE, "a@example.com", "one-click"))
                raise RuntimeError("a later call in the round failed")
        assert status_of(config, "a@example.com")[0] == "subscribed"
        with store.transaction():
            store.record_event(Event(UNSUBSCRIBE, "a@example.com", "one-click"))
            store.record_event(Event(UNSUBSCRIBE, "b@example.com", "one-click"))
        assert not store.db.in_transaction
    assert status_of(config, "a@example.com")[0] == status_of(config, "b@example.com")[0] == "unsubscribed"


def test_a_token_that_is_only_part_of_a_path_segment_is_not_logged():
    # unsubscribe_url = https://example.com/u/{token}.html: the route's parameter is the token,
    # its segment is "TOKEN.html"
    from newsletter.web.plumbing import loggable_path

    token = "ATn2Npylz6kG6lBXMZX_l2HuML-q-uN9XBd9J4bMIetVlVibrQ"
    scope = {"path": f"/u/{token}.html", "path_params": {"token": token}, "endpoint": object()}
    assert token not in loggable_path(scope) and loggable_path(scope).startswith("/u/")
