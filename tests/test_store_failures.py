"""The store on a read-only or full disk: `send` and `serve` stop with a clear error naming
the store file (no traceback, non-zero exit), the ledger calls nothing sent that was not,
the messages in flight are reported, and a rerun on a good disk reaches everyone once
(counted by the aiosmtpd server).

Read-only: a tmpfs remounted read-only (needs mount, as root), and a store file owned by
root opened by `nobody` (setpriv). A full disk: a small tmpfs, and RLIMIT_FSIZE (no
privilege: the kernel says EFBIG past the limit; Python ignores SIGXFSZ)."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import EXAMPLE, ROOT, addresses, config_for, subscribe
from newsletter.store import Store
from newsletter.tokens import Signer
from smtp_server import Handler, Server, free_port
from test_send import settings_env

ISSUE = EXAMPLE.stem


def smtp_env(folder: Path, port: int) -> dict:
    env = settings_env(folder, port, smtp_security="none", smtp_connections=1)
    del env["NEWSLETTER_SMTP_USERNAME"], env["NEWSLETTER_SMTP_PASSWORD"]
    return env


# root without the capabilities that let it write where file modes say no: the user a
# store's owner is not (another user would need to read the project and its venv, which
# a clone in a private folder does not allow)
WITHOUT_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def cli(args, env, preexec=None, unprivileged=False, timeout=60):
    outside = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    prefix = WITHOUT_OVERRIDE if unprivileged else []
    return subprocess.run([*prefix, sys.executable, "-m", "newsletter", *map(str, args)], cwd=ROOT,
                          env={**outside, "HOME": "/tmp", **env}, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


def serve(env, unprivileged=False):
    """`newsletter serve` that should refuse to start: its exit status and words."""
    return cli(["serve", "--host", "127.0.0.1", "--port", free_port()], env, unprivileged=unprivileged, timeout=30)


def assert_clear(result, store: Path, *words):
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert "Traceback" not in said
    assert str(store) in result.stderr
    for word in words:
        assert word in result.stderr.lower(), result.stderr


def dump(store: Path) -> dict:
    """Every table, every row: what a failed command must not have changed."""
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(map(repr, db.execute(f"SELECT * FROM {t}"))) for t in tables}
    finally:
        db.close()


def ledger(store: Path) -> dict[str, str]:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT email, state FROM deliveries WHERE destination = 'mail'"))
    finally:
        db.close()


def seed(folder: Path, env: dict, n: int) -> Path:
    """n subscribers, already queued for the issue (as at the start of a send), checkpointed."""
    config = config_for({**env, "NEWSLETTER_STORE_PATH": str(folder / "store.sqlite3")})
    subscribe(config, addresses(n))
    signer = Signer(config.send.secret.encode(), config.publication.list_id)
    with Store(config.store.path) as store:
        store.enqueue_subscribers(ISSUE, signer.recipient_key)
    return config.store.path


@contextlib.contextmanager
def tmpfs(size: int):
    """A tmpfs of `size` bytes; skipped where mount is not permitted (not under CI=true,
    where CI runs as root and it must work)."""
    where = Path(tempfile.mkdtemp(prefix="newsletter-tmpfs-"))
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(where)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        where.rmdir()
        if os.environ.get("CI") == "true":
            pytest.fail(f"mount -t tmpfs failed under CI=true: {result.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True, capture_output=True)


# -- a read-only store ----------------------------------------------------------------------------

def test_a_store_on_a_read_only_mount_stops_send_and_serve_naming_it(tmp_path):
    with tmpfs(8 << 20) as disk, Server(Handler(), auth=False) as server:
        handler = server.handler
        env = smtp_env(disk, server.port)
        store = seed(disk, env, 10)
        before = dump(store)
        remount(disk, "ro")
        sent = cli(["send", EXAMPLE], env)
        assert_clear(sent, store, "read-only")
        assert handler.delivered() == {}
        assert_clear(serve(env), store, "read-only")
        assert_clear(cli(["subscribers", "add", "new@example.com"], env), store, "read-only")
        remount(disk, "rw")
        assert dump(store) == before
        again = cli(["send", EXAMPLE], env)
        assert again.returncode == 0, again.stderr
        assert handler.delivered() == {a: 1 for a in addresses(10)}


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root (capabilities to drop)")
def test_a_store_file_the_user_cannot_write_stops_send_and_serve_naming_it():
    # root ignores file modes: run the commands without the capabilities that let it,
    # on a store whose files say read-only
    folder = Path(tempfile.mkdtemp(prefix="newsletter-ro-"))
    try:
        with Server(Handler(), auth=False) as server:
            env = smtp_env(folder, server.port)
            store = seed(folder, env, 10)
            for path in folder.glob(store.name + "*"):  # the store, its -wal and -shm
                path.chmod(0o444)
            before = dump(store)
            assert_clear(cli(["send", EXAMPLE], env, unprivileged=True), store, "read-only")
            assert server.handler.delivered() == {}
            assert_clear(serve(env, unprivileged=True), store, "read-only")
            assert dump(store) == before
            for path in folder.glob(store.name + "*"):
                path.chmod(0o644)
            again = cli(["send", EXAMPLE], env)  # once it may write
            assert again.returncode == 0, again.stderr
            assert server.handler.delivered() == {a: 1 for a in addresses(10)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- a disk that fills mid-send -------------------------------------------------------------------

N = 150
ROOM = 96 * 1024  # the WAL may grow by this much: room for a few messages' ledger writes, not all


def _fill_by_tmpfs(tmp_path, env_for):
    """The store on a tmpfs with ROOM bytes to spare; afterwards the tmpfs is made larger."""
    seeded = seed(tmp_path, env_for(tmp_path), N)
    size = seeded.stat().st_size + 32 * 1024 + 4096 + ROOM  # + the -shm index and the send's lock file
    stack = contextlib.ExitStack()
    disk = stack.enter_context(tmpfs(size))
    shutil.copy(seeded, disk / seeded.name)
    return disk, None, lambda: remount(disk, "size=64m"), stack


def _fill_by_rlimit(tmp_path, env_for):
    """The store where it is, each file of the process limited to ROOM bytes more than the store."""
    seeded = seed(tmp_path, env_for(tmp_path), N)
    limit = seeded.stat().st_size + ROOM

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not death (Python ignores it too)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return tmp_path, limited, lambda: None, contextlib.ExitStack()


@pytest.mark.parametrize("fill", [_fill_by_tmpfs, _fill_by_rlimit], ids=["tmpfs", "rlimit_fsize"])
def test_a_disk_that_fills_mid_send_leaves_a_true_ledger_and_a_rerun_reaches_everyone_once(tmp_path, fill):
    with Server(Handler(), auth=False) as server:
        handler = server.handler
        disk, preexec, enlarge, stack = fill(tmp_path, lambda folder: smtp_env(folder, server.port))
        with stack:
            env = smtp_env(disk, server.port)
            store = disk / "store.sqlite3"
            first = cli(["send", EXAMPLE], env, preexec=preexec)
            assert_clear(first, store)
            assert "disk" in first.stderr
            delivered = handler.delivered()
            assert 0 < len(delivered) < N, "the disk filled before the first message or not at all"
            rows = ledger(store)
            # nothing is called sent that the server did not take, and nobody got two
            assert {a for a, s in rows.items() if s == "sent"} <= set(delivered)
            assert set(delivered.values()) == {1}
            in_flight = sorted(a for a, s in rows.items() if s == "sending")
            # taken by the server, but not recorded: reported as in flight, by name
            for address in in_flight:
                assert address in first.stderr
            assert "in flight" in first.stderr
            assert set(delivered) == {a for a, s in rows.items() if s in ("sent", "sending")}

            enlarge()
            again = cli(["send", EXAMPLE], env)
            assert "Traceback" not in again.stderr
            assert again.returncode == (1 if in_flight else 0), again.stderr  # uncertain rows are not "done"
            for address in in_flight:
                assert address in again.stderr  # reported again, as uncertain, and not resent
            assert handler.delivered() == {a: 1 for a in addresses(N)}
            final = ledger(store)
            assert {a for a, s in final.items() if s == "uncertain"} == set(in_flight)
            assert {a for a, s in final.items() if s == "sent"} == set(addresses(N)) - set(in_flight)


# -- serve on a disk that fills while it runs -----------------------------------------------------

def test_serve_on_a_full_disk_answers_503_without_a_traceback_and_recovers():
    import hashlib
    import hmac
    import json

    from newsletter.web.signup import make_token
    from test_serve import Service
    from test_signup import signup_env

    with tmpfs(8 << 20) as disk:
        env = {**signup_env(disk), "NEWSLETTER_WEBHOOKS_MAILGUN_SIGNING_KEY": "mailgun-key"}
        store = seed(disk, smtp_env(disk, 1), 5)
        config = config_for(env)
        signer = Signer(config.send.secret.encode(), config.publication.list_id)
        service = Service(env, disk)
        try:
            before = dump(store)
            filler = disk / "filler"
            with open(filler, "wb") as out:  # the disk fills (something else wrote it full)
                with contextlib.suppress(OSError):
                    while True:
                        out.write(b"\0" * 65536)
                        out.flush()
            stamp, token = str(int(time.time())), "t" * 50
            signed = hmac.new(b"mailgun-key", (stamp + token).encode(), hashlib.sha256).hexdigest()
            hook = {"signature": {"timestamp": stamp, "token": token, "signature": signed},
                    "event-data": {"event": "failed", "severity": "permanent", "recipient": "r3@example.com",
                                   "id": "ev-full", "delivery-status": {"code": 550, "message": "5.1.1 no such user"}}}
            confirm = make_token(config.send.secret.encode(), config.publication.list_id, "new@example.com", None,
                                 int(time.time()) + 3600)
            unsubscribe = signer.token(signer.recipient_key("r1@example.com"))
            answers = {
                "one-click": service.unsubscribe(unsubscribe),
                "webhook": service.client.post("/webhooks/mailgun", content=json.dumps(hook)),
                "confirm": service.client.post(f"/subscribe/confirm/{confirm}"),
            }
            for what, answer in answers.items():
                assert answer.status_code == 503, (what, answer.status_code, answer.text)
            filler.unlink()
            assert dump(store) == before
            assert service.unsubscribe(unsubscribe).status_code == 200  # the same store, space again
        finally:
            log = service.stop()
        assert "Traceback" not in log, log
