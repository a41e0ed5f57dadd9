"""No secret ever leaves the process: every secret is set to a marker value, every command
is run (each backend, failures forced: no server, refused logins, 401/403/500 from the API
stand-in, TLS errors, bad settings), and the marker (raw, base64 at each alignment, URL-
encoded, quoted-printable, JSON- and HTML-escaped) must appear in no stdout, stderr, page,
access log, or file the command wrote (outbox .eml, dist/, site/, the store itself)."""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import quopri
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, quote_plus

import httpx
import pytest

import api_server
from api_server import MAILGUN_DOMAIN, SES_REGION, ApiServer
from conftest import EXAMPLE, ROOT, addresses, config_for, subscribe
from smtp_server import Handler, Server, free_port, make_certificate


def marker(tag: str) -> str:
    # characters that every encoding changes: '/', '+', '=', ' ', '&'
    return f"Qz{tag}Mk7/+= &{tag}X9"


SMTP_PASSWORD = marker("smtppass")
API_KEYS = {p: marker(f"{p}key") for p in ("sendgrid", "mailgun", "postmark", "resend")}
AWS_SECRET = marker("awssecret")
AWS_TOKEN = marker("awstoken")
SIGNING_SECRET = marker("signing")
MAILGUN_SIGNING = marker("mgsigning")
POSTMARK_PASSWORD = marker("pmhookpass")
RESEND_SECRET_RAW = marker("rshook")  # the bytes the whsec_ secret encodes
SENDGRID_PUBLIC = marker("sgpublic")
IMAP_PASSWORD = marker("imappass")
PG_PASSWORD = marker("pgpass")
WRONG = marker("wrongkey")  # a wrong secret given in its place: no more printable than a right one


def dkim_key() -> tuple[str, list[str]]:
    """An RSA key for DKIM, and the lines of its PEM body (each one must stay hidden)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return pem, [line for line in pem.splitlines()[2:-2]]


DKIM_PEM, DKIM_LINES = dkim_key()
MARKERS = [SMTP_PASSWORD, *API_KEYS.values(), AWS_SECRET, AWS_TOKEN, SIGNING_SECRET, MAILGUN_SIGNING,
           POSTMARK_PASSWORD, RESEND_SECRET_RAW, SENDGRID_PUBLIC, IMAP_PASSWORD, PG_PASSWORD, WRONG, *DKIM_LINES]


def forms(secret: str) -> set[str]:
    raw = secret.encode()
    found = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret), json.dumps(secret)[1:-1],
             html.escape(secret), quopri.encodestring(raw).decode().replace("=\n", "")}
    for pad, start in ((0, 0), (1, 2), (2, 3)):  # base64 of the secret wherever it starts in its 3-byte group
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            found.add(encode(b"\0" * pad + raw).decode()[start:-4])
    found.add(base64.b64encode(raw).decode())
    return {f for f in found if len(f) >= 12}


FORMS = {f: s for s in MARKERS for f in forms(s)}


def leaks(where: str, data: bytes | str) -> list[str]:
    text = data if isinstance(data, str) else data.decode("latin-1")
    unfolded = re.sub(r"\r?\n[ \t]", " ", text)  # a folded header line
    return [f"{where}: {secret[:12]}... as {form!r}" for form, secret in FORMS.items()
            if form in text or form in unfolded]


def test_the_scanner_finds_each_form():
    """The oracle itself: each way a secret could be written out is found."""
    secret = SMTP_PASSWORD
    for n in range(3):  # AUTH PLAIN puts it anywhere in a base64 group
        assert leaks("auth", base64.b64encode(b"\0" + b"u" * n + b"\0" + secret.encode()))
    assert leaks("qp", quopri.encodestring(f"password: {secret}".encode()))
    assert leaks("url", "https://x/?k=" + quote_plus(secret))
    assert leaks("json", json.dumps({"k": secret}))
    assert leaks("pem", DKIM_PEM)
    assert not leaks("clean", "Qzsmtppass Mk7 nothing here")


def written_files(folder: Path) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "newsletter.toml":  # the user's own (a secret put there on purpose)
            found += leaks(str(path.relative_to(folder)), path.read_bytes())
    return found


def base_env(folder: Path) -> dict:
    return {
        "NEWSLETTER_SECRET": SIGNING_SECRET,
        "NEWSLETTER_DESIGN_TEMPLATES": str(ROOT / "templates"),
        "NEWSLETTER_STORE_PATH": str(folder / "store.sqlite3"),
        "NEWSLETTER_SEND_OUTBOX": str(folder / "outbox"),
        "NEWSLETTER_SEND_RETRY_DELAY": "0.05",
        "NEWSLETTER_SEND_MAX_WAIT": "2",
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(free_port()),  # nobody: each case that wants a server says so
        "NEWSLETTER_SMTP_USERNAME": "sender",
        "NEWSLETTER_SMTP_PASSWORD": SMTP_PASSWORD,
        "NEWSLETTER_SMTP_TIMEOUT": "5",
        "NEWSLETTER_SMTP_GIVE_UP_AFTER": "1",
        **{f"NEWSLETTER_{p.upper()}_API_KEY": key for p, key in API_KEYS.items()},
        "NEWSLETTER_MAILGUN_DOMAIN": MAILGUN_DOMAIN,
        "NEWSLETTER_SES_REGION": SES_REGION,
        **{f"NEWSLETTER_{p.upper()}_{k}": v for p in api_server.PROVIDERS
           for k, v in (("TIMEOUT", "5"), ("MAX_RETRIES", "1"), ("RETRY_DELAY", "0.05"),
                        ("BASE_URL", f"http://127.0.0.1:{free_port()}"))},
        "AWS_ACCESS_KEY_ID": api_server.AWS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "AWS_SESSION_TOKEN": AWS_TOKEN,
        "NEWSLETTER_WEBHOOKS_SENDGRID_PUBLIC_KEY": SENDGRID_PUBLIC,
        "NEWSLETTER_WEBHOOKS_MAILGUN_SIGNING_KEY": MAILGUN_SIGNING,
        "NEWSLETTER_WEBHOOKS_POSTMARK_USERNAME": "postmark-hook",
        "NEWSLETTER_WEBHOOKS_POSTMARK_PASSWORD": POSTMARK_PASSWORD,
        "NEWSLETTER_WEBHOOKS_RESEND_SECRET": "whsec_" + base64.b64encode(RESEND_SECRET_RAW.encode()).decode(),
        "NEWSLETTER_WEBHOOKS_SES_ENABLED": "true",
        "NEWSLETTER_INBOX_HOST": "127.0.0.1",
        "NEWSLETTER_INBOX_PORT": str(free_port()),
        "NEWSLETTER_INBOX_USERNAME": "bounces",
        "NEWSLETTER_INBOX_PASSWORD": IMAP_PASSWORD,
        "NEWSLETTER_INBOX_TIMEOUT": "5",
        "NEWSLETTER_DKIM_DOMAIN": "example.com",
        "NEWSLETTER_DKIM_PRIVATE_KEY": DKIM_PEM,
        "NEWSLETTER_SERVE_PUBLIC_URL": "https://news.example.com",
        "NEWSLETTER_SIGNUP_ENABLED": "true",
        "PGPASSWORD": PG_PASSWORD,  # the SQLite cases ignore it; test_postgres_... uses it
    }


class World:
    """A project folder with the markers set, and the servers each case points at."""

    def __init__(self, root: Path, cert, smtp_ok: Server, smtp_tls: Server, api: ApiServer):
        self.root, self.cert, self.smtp_ok, self.smtp_tls, self.api = root, cert, smtp_ok, smtp_tls, api
        self.ran: list[str] = []

    def project(self, name: str, readers: list[str] | None = None) -> tuple[Path, dict]:
        folder = self.root / name
        folder.mkdir()
        shutil.copy(ROOT / "newsletter.toml", folder)
        (folder / "issues").mkdir()
        shutil.copy(EXAMPLE, folder / "issues")
        env = base_env(folder)
        subscribe(config_for(env), readers or addresses(3))
        return folder, env

    def run(self, folder: Path, env: dict, *args, timeout=60) -> subprocess.CompletedProcess:
        outside = {k: v for k, v in os.environ.items()
                   if not k.startswith(("NEWSLETTER_", "AWS_")) and k != "PGPASSWORD"}
        result = subprocess.run([sys.executable, "-m", "newsletter", *map(str, args)], cwd=folder,
                                env={**outside, **env}, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        self.ran.append(" ".join(map(str, args)))
        return result


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("secrets")
    cert = make_certificate(root)
    with pytest.MonkeyPatch.context() as patch:
        # the API stand-in takes the markers (a success path), and only them
        for provider, key in API_KEYS.items():
            patch.setitem(api_server.KEYS, provider, key)
        patch.setattr(api_server, "AWS_SECRET", AWS_SECRET)
        with Server(Handler(), credentials=("sender", SMTP_PASSWORD), auth=True, tls=None) as smtp_ok, \
                Server(Handler(), tls=cert, credentials=("sender", SMTP_PASSWORD)) as smtp_tls, \
                ApiServer(aws_token=AWS_TOKEN) as api:
            yield World(root, cert, smtp_ok, smtp_tls, api)


def check(world: World, folder: Path, result: subprocess.CompletedProcess, *extra: tuple[str, str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    found = leaks("stdout", result.stdout) + leaks("stderr", result.stderr) + written_files(folder)
    for where, text in extra:
        found += leaks(where, text)
    assert not found, "\n".join(found)


# -- each command, each way it can fail --------------------------------------------------------------

def _smtp(world, security="none", server="ok"):
    chosen = world.smtp_ok if server == "ok" else world.smtp_tls
    return {"NEWSLETTER_SEND_BACKEND": "smtp", "NEWSLETTER_SMTP_PORT": str(chosen.port),
            "NEWSLETTER_SMTP_SECURITY": security}


def _api(world, provider):
    return {"NEWSLETTER_SEND_BACKEND": provider, f"NEWSLETTER_{provider.upper()}_BASE_URL": world.api.url}


SEND = ["send", f"issues/{EXAMPLE.name}"]
PROVIDERS = api_server.PROVIDERS
COMMANDS = ["init", "new", "check", "build", "archive", "send", "serve", "snapshot", "preview", "inbox", "store",
            "status", "subscribers"]

CASES = {
    "help": lambda w: ([["--help"], *([c, "--help"] for c in COMMANDS)], {}),
    "check": lambda w: ([["check"], ["check", "--strict"], ["check", "issues/missing.yaml"]], {}),
    "build": lambda w: ([["build"], ["build", "--out", "/proc/no-such/dir"]], {}),
    "archive": lambda w: ([["archive"]], {}),
    "new": lambda w: ([["new", "--date", "2024-01-02", "--title", "Hello"]], {}),
    "init": lambda w: ([["init", "fresh", "--name", "A Letter", "--sender", "a@example.com",
                         "--postal-address", "1 Road, Town"], ["init", "bad", "--sender", "nope"]], {}),
    "subscribers": lambda w: ([["subscribers", "add", "n@example.com"], ["subscribers", "list"],
                               ["subscribers", "export"], ["subscribers", "remove", "n@example.com"],
                               ["subscribers", "restore", "r0@example.com"]], {}),
    "status": lambda w: ([["status", EXAMPLE.stem]], {}),
    "send-outbox": lambda w: ([SEND + ["--backend", "outbox"], ["status", EXAMPLE.stem]], {}),
    "send-dry-run": lambda w: ([SEND + ["--dry-run"], SEND + ["--dry-run", "--backend", "smtp"]], _smtp(w)),
    "send-test": lambda w: ([SEND + ["--test", "t@example.com"]], _smtp(w)),
    "smtp-ok": lambda w: ([SEND, ["status", EXAMPLE.stem]], _smtp(w)),
    "smtp-no-server": lambda w: ([SEND, SEND + ["--test", "t@example.com"]],
                                 {"NEWSLETTER_SEND_BACKEND": "smtp", "NEWSLETTER_SMTP_SECURITY": "none"}),
    "smtp-auth-refused": lambda w: ([SEND, ["status", EXAMPLE.stem]],
                                    {**_smtp(w), "NEWSLETTER_SMTP_PASSWORD": WRONG}),
    "smtp-tls-untrusted": lambda w: ([SEND], _smtp(w, "starttls", "tls")),
    "smtp-ssl-to-plain": lambda w: ([SEND], _smtp(w, "ssl", "ok")),
    "smtp-plain-auth-to-tls-server": lambda w: ([SEND], _smtp(w, "none", "tls")),
    **{f"{p}-ok": (lambda w, p=p: ([SEND, ["status", EXAMPLE.stem]], _api(w, p))) for p in PROVIDERS},
    **{f"{p}-no-server": (lambda w, p=p: ([SEND, SEND + ["--test", "t@example.com"]],
                                          {"NEWSLETTER_SEND_BACKEND": p})) for p in PROVIDERS},
    **{f"{p}-wrong-key": (lambda w, p=p: ([SEND, ["status", EXAMPLE.stem]], {
        **_api(w, p), ("AWS_SECRET_ACCESS_KEY" if p == "ses" else f"NEWSLETTER_{p.upper()}_API_KEY"): WRONG}))
       for p in PROVIDERS},
    **{f"{p}-500": (lambda w, p=p: ([SEND, ["status", EXAMPLE.stem]], {**_api(w, p), "FAIL": "500"}))
       for p in PROVIDERS},
    **{f"{p}-403": (lambda w, p=p: ([SEND, ["status", EXAMPLE.stem]], {**_api(w, p), "REFUSE": "403"}))
       for p in PROVIDERS},
    "inbox-no-server": lambda w: ([["inbox"]], {}),
    "inbox-tls-to-plain": lambda w: ([["inbox"]], {"NEWSLETTER_INBOX_PORT": str(w.smtp_ok.port)}),
    "inbox-starttls-untrusted": lambda w: ([["inbox"]], {"NEWSLETTER_INBOX_PORT": str(w.smtp_ok.port),
                                                         "NEWSLETTER_INBOX_SECURITY": "starttls"}),
    "serve-no-secret-set": lambda w: ([["serve", "--port", free_port()]], {"NEWSLETTER_SECRET": None}),
    "bad-settings-secret-in-file": lambda w: ([["build"], SEND], {"FILE": f'[smtp]\npassword = "{SMTP_PASSWORD}"\n'
                                                                          f'[resend]\napi_key = "{API_KEYS["resend"]}"\n'}),
    "bad-settings-two-line-secret": lambda w: ([["build"], SEND], {"NEWSLETTER_SMTP_PASSWORD": f"{SMTP_PASSWORD}\nx",
                                                                   "NEWSLETTER_SENDGRID_API_KEY": f"a\n{API_KEYS['sendgrid']}"}),
    "bad-settings-misspelt-name": lambda w: ([["build"], ["status", EXAMPLE.stem]],
                                             {"NEWSLETTER_SMTP_PASWORD": SMTP_PASSWORD,
                                              "NEWSLETTER_INBOX_PASSWROD": IMAP_PASSWORD}),
    "bad-settings-store-url": lambda w: ([["build"], ["status", EXAMPLE.stem]],
                                         {"NEWSLETTER_STORE_URL": f"postgresql://news:{quote(PG_PASSWORD, safe='')}"
                                                                  "@127.0.0.1:1/news"}),
    "bad-settings-invalid-value": lambda w: ([SEND], {**_smtp(w), "NEWSLETTER_SMTP_PORT": "notaport"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_command_prints_or_writes_a_secret(world, case):
    commands, changes = CASES[case](world)
    folder, env = world.project(case)
    changes = dict(changes)
    if "FILE" in changes:  # settings put under their section's header
        settings = (folder / "newsletter.toml").read_text()
        for section, line in re.findall(r"(\[\w+\])\n([^\n]*)", changes.pop("FILE")):
            settings = settings.replace(f"{section}\n", f"{section}\n{line}\n", 1) if f"{section}\n" in settings \
                else settings + f"\n{section}\n{line}\n"
        (folder / "newsletter.toml").write_text(settings)
    if "FAIL" in changes:
        world.api.fail(times=100, status=int(changes.pop("FAIL")))
    if "REFUSE" in changes:
        world.api.refuse(int(changes.pop("REFUSE")), "forbidden: the account is not allowed to send", times=100)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    try:
        for args in commands:
            result = world.run(folder, env, *args, timeout=90)
            if os.environ.get("SECRETS_DEBUG"):
                print(f"\n### {case}: {' '.join(map(str, args))} -> {result.returncode}\n{result.stderr[-600:]}")
            check(world, folder, result)
            if args[0] == "send" and "--dry-run" not in args and \
                    any(w in case for w in ("no-server", "wrong", "refused", "tls", "ssl", "bad-settings", "403", "500")):
                assert result.returncode != 0, f"{case}: the failure was not forced: {result.stderr}"
    finally:
        world.api._fail.clear()
        world.api._refuse.clear()


def test_success_paths_really_used_the_secrets(world):
    """The -ok cases are only worth something if the servers took the markers: send once
    more here and count what arrived."""
    folder, env = world.project("proof-smtp")
    before = len(world.smtp_ok.handler.received)
    assert world.run(folder, {**env, **_smtp(world)}, *SEND).returncode == 0
    assert len(world.smtp_ok.handler.received) == before + 3
    for provider in PROVIDERS:
        # readers of its own: Resend replays an Idempotency-Key it has seen, recording nothing
        folder, env = world.project(f"proof-{provider}", addresses(3, prefix=f"proof-{provider}-"))
        before = len(world.api.received)
        result = world.run(folder, {**env, **_api(world, provider)}, *SEND)
        assert result.returncode == 0, result.stderr
        assert len(world.api.received) == before + 3, (provider, result.stdout, result.stderr)


# -- the long-running ones: serve, preview, inbox against dovecot -------------------------------------

@contextlib.contextmanager
def running(folder: Path, env: dict, *args):
    outside = {k: v for k, v in os.environ.items()
               if not k.startswith(("NEWSLETTER_", "AWS_")) and k != "PGPASSWORD"}
    log = open(folder / "process.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "newsletter", *map(str, args)], cwd=folder,
                            env={**outside, **env}, stdout=subprocess.PIPE, stderr=log, text=True,
                            start_new_session=True)
    try:
        yield proc, log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        log.close()


def wait_for(url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url, timeout=5)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_serve_pages_answers_and_access_log_hold_no_secret(world):
    import hashlib
    import hmac
    folder, env = world.project("serve")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    seen: list[tuple[str, str]] = []
    with running(folder, env, "serve", "--host", "127.0.0.1", "--port", port) as (proc, log):
        wait_for(f"{base}/health")
        with httpx.Client(base_url=base, timeout=30) as client:
            def keep(response, what):
                seen.append((what, "\n".join(f"{k}: {v}" for k, v in response.headers.items()) + response.text))
                assert response.status_code < 500, (what, response.status_code, response.text)
                return response

            keep(client.get("/health"), "health")
            keep(client.get("/subscribe"), "sign-up form")
            keep(client.post("/subscribe", data={"email": "new@example.com", "name": "New"}), "sign-up")
            keep(client.post("/subscribe", json={"email": "json@example.com"}), "sign-up json")
            keep(client.get("/subscribe/confirm/not-a-token"), "confirm, bad token")
            keep(client.get("/unsubscribe/not-a-token"), "unsubscribe, bad token")
            keep(client.post("/unsubscribe/AAAA", content=b"List-Unsubscribe=One-Click",
                             headers={"content-type": "application/x-www-form-urlencoded"}), "one-click")
            for provider in PROVIDERS:
                keep(client.post(f"/webhooks/{provider}", content=b"{}",
                                 headers={"content-type": "application/json"}), f"{provider} webhook, unsigned")
            keep(client.post("/webhooks/postmark", content=b"[]", auth=("postmark-hook", WRONG)),
                 "postmark, wrong password")
            keep(client.post("/webhooks/resend", content=b"{}", headers={
                "svix-id": "msg_1", "svix-timestamp": str(int(time.time())), "svix-signature": "v1,AAAA"}),
                 "resend, bad signature")
            # a good Mailgun signature: the key was used, and still is not said
            stamp, token = str(int(time.time())), "t" * 50
            signature = hmac.new(MAILGUN_SIGNING.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
            body = {"signature": {"timestamp": stamp, "token": token, "signature": signature},
                    "event-data": {"event": "failed", "severity": "permanent", "recipient": "r1@example.com",
                                   "id": "ev1", "delivery-status": {"code": 550, "message": "no such user"}}}
            answer = keep(client.post("/webhooks/mailgun", json=body), "mailgun, signed")
            assert answer.status_code == 200, answer.text
        # the confirmation mails went to the outbox: a link in them, never the secret
        outbox = list((folder / "outbox").rglob("*.eml"))
        assert outbox, "the sign-up sent no confirmation"
        log.seek(0)
        seen.append(("access log", log.read()))
    check(world, folder, subprocess.CompletedProcess([], 0, "", ""), *seen)


def test_preview_page_holds_no_secret(world):
    folder, env = world.project("preview")
    with running(folder, env, "preview", f"issues/{EXAMPLE.name}", "--port", "0") as (proc, log):
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        found = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert found, line
        pages = []
        with httpx.Client(timeout=30) as client:
            index = client.get(found[0])
            pages.append(("preview", index.text))
            for path in set(re.findall(r'(?:src|href)="(/[^"]*)"', index.text)):
                pages.append((path, client.get(found[0].rstrip("/") + path).text))
    check(world, folder, subprocess.CompletedProcess([], 0, "", ""), *pages)


def test_inbox_login_refused_and_accepted_says_no_password(world, monkeypatch):
    from conftest import require
    require("dovecot", shutil.which("dovecot") is not None)
    import imap_server
    monkeypatch.setattr(imap_server, "PASSWORD", IMAP_PASSWORD)
    dovecot = imap_server.Dovecot()
    try:
        folder, env = world.project("inbox")
        env.update(NEWSLETTER_INBOX_PORT=str(dovecot.imaps_port), NEWSLETTER_INBOX_CA_FILE=str(dovecot.cert),
                   NEWSLETTER_INBOX_USERNAME=imap_server.USER)
        ok = world.run(folder, env, "inbox")
        assert ok.returncode == 0, ok.stderr
        check(world, folder, ok)
        refused = world.run(folder, {**env, "NEWSLETTER_INBOX_PASSWORD": WRONG}, "inbox")
        assert refused.returncode != 0
        check(world, folder, refused)
    finally:
        dovecot.stop()


def test_snapshot_says_no_secret(world):
    folder, env = world.project("snapshot")
    result = world.run(folder, env, "snapshot", f"issues/{EXAMPLE.name}", "--out", "shots", timeout=180)
    check(world, folder, result)


def test_postgres_store_password_is_never_said(world, monkeypatch):
    """[store] url names a PostgreSQL store; its password is PGPASSWORD's marker: taken by
    the server (a success path), refused (wrong password), or no server at all."""
    import pg_server
    from conftest import require
    require("PostgreSQL (Debian's postgresql)", pg_server.installed())
    require("psycopg", bool(__import__("importlib").util.find_spec("psycopg")))
    monkeypatch.setattr(pg_server, "PASSWORD", PG_PASSWORD)
    with pg_server.PostgresServer() as server:
        folder, env = world.project("postgres")
        env["NEWSLETTER_STORE_URL"] = server.new_database()
        runs = [(env, ["subscribers", "add", "pg@example.com"], 0), (env, ["subscribers", "list"], 0),
                (env, SEND + ["--backend", "outbox"], 0), (env, ["status", EXAMPLE.stem], 0),
                (env, ["store", "info"], 0), (env, ["store", "migrate"], 0),
                (env, ["store", "copy", env["NEWSLETTER_STORE_URL"], str(folder / "copy.sqlite3")], 0),
                (env, ["store", "copy", str(folder / "copy.sqlite3"), env["NEWSLETTER_STORE_URL"]], 2),
                ({**env, "PGPASSWORD": WRONG}, ["subscribers", "list"], 2),
                ({**env, "PGPASSWORD": WRONG}, SEND + ["--backend", "outbox"], 2),
                ({**env, "NEWSLETTER_STORE_URL": f"postgresql://{pg_server.USER}@127.0.0.1:{free_port()}/x"},
                 ["status", EXAMPLE.stem], 2)]
        for run_env, args, expected in runs:
            result = world.run(folder, run_env, *args)
            assert result.returncode == expected, (args, result.stderr)
            check(world, folder, result)
        assert "pg@example.com" in world.run(folder, env, "subscribers", "list").stdout
