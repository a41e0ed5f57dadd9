"""Sending through a real SMTP server on loopback (aiosmtpd, STARTTLS, AUTH): every
subscriber gets exactly one message, replies are honoured, and a send that is killed
resumes without losing or doubling anyone the ledger calls sent."""

import email
import email.policy
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import EXAMPLE, ROOT, addresses, config_for, store_env, store_of, subscribe
from newsletter.errors import SendError, StoreError
from newsletter.sender import send_issue
from smtp_server import PASSWORD, USER, Handler, Server, make_certificate

pytestmark = pytest.mark.usefixtures("store_backend")  # each test on SQLite and on PostgreSQL


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


def settings_env(tmp_path, port, cert=None, **extra):
    env = {
        "NEWSLETTER_SECRET": "test-secret-not-for-production",
        "NEWSLETTER_DESIGN_TEMPLATES": str(ROOT / "templates"),
        "NEWSLETTER_STORE_PATH": str(tmp_path / "store.sqlite3"),
        "NEWSLETTER_SEND_BACKEND": "smtp",
        "NEWSLETTER_SEND_OUTBOX": str(tmp_path / "outbox"),
        "NEWSLETTER_SEND_RETRY_DELAY": "0.05",
        "NEWSLETTER_SEND_MAX_WAIT": "10",
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(port),
        "NEWSLETTER_SMTP_USERNAME": USER,
        "NEWSLETTER_SMTP_PASSWORD": PASSWORD,
        "NEWSLETTER_SMTP_TIMEOUT": "10",
    }
    if cert:
        env["NEWSLETTER_SMTP_CA_FILE"] = str(cert[0])
    env.update({f"NEWSLETTER_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def unsubscribe_url(data: bytes) -> str:
    message = email.message_from_bytes(data, policy=email.policy.default)
    return str(message["List-Unsubscribe"]).split(">")[0].lstrip("<")


def test_each_subscriber_gets_exactly_one_message_over_starttls_and_auth(tmp_path, cert):
    handler = Handler()
    with Server(handler, tls=cert) as server:
        env = settings_env(tmp_path, server.port, cert, smtp_connections=3, smtp_messages_per_connection=4)
        config = config_for(env)
        everyone = addresses(20)
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        assert summary.this_run["sent"] == 20
        assert summary.counts["sent"] == 20 and summary.counts["pending"] == 0
        assert handler.delivered() == {a: 1 for a in everyone}
        assert len(handler.sessions) >= 5  # 4 messages a connection, then a new one
        urls = {r.recipient: unsubscribe_url(r.data) for r in handler.received}
        assert len(set(urls.values())) == 20  # each with their own unsubscribe link
        for received in handler.received:
            body = email.message_from_bytes(received.data, policy=email.policy.default)
            assert body["To"].addresses[0].addr_spec == received.recipient
            html = body.get_body(("html",)).get_content()
            assert f'href="{urls[received.recipient]}"' in html
        again = send_issue(EXAMPLE, config)  # resuming a finished send sends nobody anything
        assert again.this_run["sent"] == 0 and len(handler.received) == 20


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-command-at-a-time"])
def test_server_replies_are_honoured(tmp_path, cert, pipelining):
    script = {
        "r1@example.com": ["451 4.3.0 Try again later"],
        "r2@example.com": ["452 4.2.2 Mailbox full"],
        "r3@example.com": ["550 5.1.1 No such user"],
        "r4@example.com": ["550 5.7.1 Rejected by policy"],
        "r5@example.com": ["drop"],
        "r6@example.com": ["421 4.7.0 Too busy, closing"],
        "r7@example.com": ["451 4.3.0 Later"] * 10,
    }
    handler = Handler(pipelining=pipelining, script=script)
    with Server(handler, tls=cert) as server:
        config = config_for(settings_env(tmp_path, server.port, cert, send_max_attempts=3, smtp_connections=2))
        everyone = addresses(10)
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        delivered = handler.delivered()
        with store_of(config) as store:
            states = {e: (s, r, a) for e, s, r, a in
                      store.db.execute("SELECT email, state, reply, attempts FROM deliveries")}
            bounced = dict(store.db.execute("SELECT email, status FROM subscribers WHERE status != 'subscribed'"))
            suppressed = {e for (e,) in store.db.execute("SELECT email FROM suppressions")}

    for ok in ("r0", "r1", "r2", "r6", "r8", "r9"):
        assert delivered[f"{ok}@example.com"] == 1, ok
        assert states[f"{ok}@example.com"][0] == "sent", ok
    # Dropped after the content went out: it may have been delivered, so never resent by itself.
    assert states["r5@example.com"][0] == "uncertain" and "after the message was sent" in states["r5@example.com"][1]
    assert "r5@example.com" not in delivered
    assert handler.attempts["r1@example.com"] == 2 and states["r1@example.com"][2] == 2  # 451, then sent
    assert handler.attempts["r2@example.com"] == 2  # 452, then sent
    assert handler.attempts["r6@example.com"] == 2  # 421: a new connection, then sent
    # 5xx: failed at once, never retried; 5.1.x also suppresses the address.
    assert states["r3@example.com"][:2] == ("failed", "550 5.1.1 No such user")
    assert handler.attempts["r3@example.com"] == 1 and "r3@example.com" not in delivered
    assert suppressed == {"r3@example.com"} and bounced == {"r3@example.com": "bounced"}
    # A policy refusal that names no one: failed, but never suppressed.
    assert states["r4@example.com"][0] == "failed" and handler.attempts["r4@example.com"] == 1
    # Always 4xx: retried with backoff up to max_attempts, then failed with the last reply.
    # (An envelope sent early behind r5's content, on the connection r5's drop closed, is
    # not a try: the client never read its reply.)
    assert len([s for r, s in handler.rcpts if r == "r7@example.com" and s not in handler.dropped]) == 3
    assert states["r7@example.com"][2] == 3
    assert states["r7@example.com"][0] == "failed" and "gave up after 3 attempts" in states["r7@example.com"][1]
    assert summary.counts == {"pending": 0, "sending": 0, "sent": 6, "deferred": 0, "failed": 3, "skipped": 0,
                              "uncertain": 1}

    with Server(handler, tls=cert) as server:  # a later send never retries the failed or uncertain ones
        config = config_for(settings_env(tmp_path, server.port, cert))
        send_issue(EXAMPLE, config)
        assert handler.attempts["r3@example.com"] == 1 and handler.attempts["r4@example.com"] == 1
        assert "r5@example.com" not in handler.delivered()
        # ... unless asked: the uncertain one once, the failures that were not the reader's own
        # (the policy refusal, the one given up on), never the mailbox that does not exist.
        summary = send_issue(EXAMPLE, config, resend_uncertain=True, retry_failed=True)
    assert handler.delivered()["r5@example.com"] == 1 and handler.delivered()["r4@example.com"] == 1
    tries = [s for r, s in handler.rcpts if r == "r7@example.com" and s not in handler.dropped]
    assert len(tries) == 3 + 5  # retried afresh: max_attempts (5) more, still 451
    assert handler.attempts["r3@example.com"] == 1
    assert summary.counts["sent"] == 8 and summary.counts["failed"] == 2


def test_untrusted_certificate_stops_before_anything_is_sent(tmp_path, cert):
    handler = Handler()
    with Server(handler, tls=cert) as server:
        env = settings_env(tmp_path, server.port, cert=None)  # no CA file: the self-signed cert is unknown
        config = config_for(env)
        subscribe(config, addresses(3))
        with pytest.raises(SendError, match="certificate is not trusted"):
            send_issue(EXAMPLE, config)
        with store_of(config) as store:
            assert store.counts(EXAMPLE.stem)["pending"] == 3
        assert handler.received == []
        # Turning verification off is an explicit, visible choice.
        summary = send_issue(EXAMPLE, config_for({**env, "NEWSLETTER_SMTP_VERIFY_TLS": "false"}))
        assert summary.counts["sent"] == 3


def test_starttls_required_but_not_offered(tmp_path):
    handler = Handler()
    with Server(handler, tls=None, auth=False) as server:
        config = config_for(settings_env(tmp_path, server.port))
        subscribe(config, addresses(2))
        with pytest.raises(SendError, match="does not offer STARTTLS; refusing to send in the clear"):
            send_issue(EXAMPLE, config)
        assert handler.received == []


def test_wrong_password_is_reported_without_the_password(tmp_path, cert):
    handler = Handler()
    with Server(handler, tls=cert) as server:
        config = config_for({**settings_env(tmp_path, server.port, cert), "NEWSLETTER_SMTP_PASSWORD": "hunter2-wrong"})
        subscribe(config, addresses(2))
        with pytest.raises(SendError) as caught:
            send_issue(EXAMPLE, config)
        assert "login refused: 535" in str(caught.value) and "hunter2" not in str(caught.value)
        with store_of(config) as store:
            assert store.counts(EXAMPLE.stem)["pending"] == 2


def test_unsubscribed_and_suppressed_addresses_are_never_sent_to(tmp_path, cert):
    handler = Handler(script={"r1@example.com": ["451 4.3.0 Later"]})
    with Server(handler, tls=cert) as server:
        config = config_for(settings_env(tmp_path, server.port, cert, send_max_wait=0))
        subscribe(config, addresses(5))
        with store_of(config) as store:
            store.set_status("r2@example.com", "unsubscribed", "test")
            store.suppress("R3@EXAMPLE.COM", "complaint")
        first = send_issue(EXAMPLE, config)  # r1 deferred; max_wait 0 ends the run
        assert first.counts["deferred"] == 1 and first.stopped
        with store_of(config) as store:  # r1 unsubscribes before the retry
            store.set_status("r1@example.com", "unsubscribed", "one-click")
        time.sleep(0.2)
        second = send_issue(EXAMPLE, config)
    assert set(handler.delivered()) == {"r0@example.com", "r4@example.com"}
    assert second.counts["skipped"] == 1 and second.counts["sent"] == 2


def test_send_to_a_csv_list(tmp_path, cert):
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("email,name,city\nana@example.com,Ana,Porto\nnot an address,X,Y\n"
                        "ANA@example.com,Ana again,Porto\nbo@example.org,Bo,Oslo\nsup@example.com,S,Z\n")
    handler = Handler()
    with Server(handler, tls=cert) as server:
        config = config_for(settings_env(tmp_path, server.port, cert))
        with store_of(config) as store:
            store.suppress("sup@example.com", "hard bounce")
        summary = send_issue(EXAMPLE, config, to_csv=csv_file)
    assert handler.delivered() == {"ana@example.com": 1, "bo@example.org": 1}
    assert summary.csv.invalid == [(3, "not an address", "expected an address like name@example.com")]
    assert summary.csv.duplicates == 1
    with store_of(config) as store:
        assert list(store.subscribers()) == []  # a one-off list does not become subscribers


def test_test_send_and_dry_run_record_nothing(tmp_path, cert):
    handler = Handler()
    with Server(handler, tls=cert) as server:
        config = config_for(settings_env(tmp_path, server.port, cert))
        subscribe(config, addresses(4))
        dry = send_issue(EXAMPLE, config, dry_run=True)
        assert dry.built == 4 and handler.received == []
        test = send_issue(EXAMPLE, config, test_addresses=["editor@example.com", "proof@example.org"])
        assert test.this_run["sent"] == 2
        with store_of(config) as store:
            assert sum(store.counts(EXAMPLE.stem).values()) == 0
    assert set(handler.delivered()) == {"editor@example.com", "proof@example.org"}
    subject = email.message_from_bytes(handler.received[0].data, policy=email.policy.default)["Subject"]
    assert subject.startswith("[TEST] ")


def test_a_real_send_needs_the_secret(tmp_path, cert):
    env = settings_env(tmp_path, 1, cert)
    del env["NEWSLETTER_SECRET"]
    config = config_for(env)
    subscribe(config, addresses(1))
    with pytest.raises(Exception, match="NEWSLETTER_SECRET is not set"):
        send_issue(EXAMPLE, config)


# -- as a process: kill, resume, lock, exit codes ---------------------------------------------

def cli(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "newsletter", *map(str, args)], cwd=ROOT,
                            env={**os.environ, **store_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_killed_send_resumes_without_losing_or_doubling_anyone(tmp_path, cert):
    handler = Handler(delay=0.01)
    everyone = addresses(150)
    with Server(handler, tls=cert) as server:
        env = settings_env(tmp_path, server.port, cert, smtp_connections=2)
        config = config_for(env)
        subscribe(config, everyone)
        first = cli(["send", EXAMPLE], env)
        wait_for(lambda: len(handler.received) >= 40)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        time.sleep(0.3)  # let the server finish what it was in the middle of
        with store_of(config) as store:
            counts = store.counts(EXAMPLE.stem)
            called_sent = {e for (e,) in store.db.execute("SELECT email FROM deliveries WHERE state = 'sent'")}
            in_flight = {e for e, _ in store.in_flight(EXAMPLE.stem)}
        assert 0 < counts["sent"] < 150 and counts["sending"] <= 2  # at most one per connection
        delivered = handler.delivered()
        for address in called_sent:  # everyone the ledger calls sent has exactly one copy
            assert delivered[address] == 1, address

        resumed = cli(["send", EXAMPLE], env)
        out, err = resumed.communicate(timeout=60)
        with store_of(config) as store:
            uncertain = {e for (e,) in store.db.execute("SELECT email FROM deliveries WHERE state = 'uncertain'")}
        # The rows in flight at the kill may have been delivered: reported, never resent by themselves.
        assert uncertain == in_flight
        if in_flight:
            assert resumed.returncode == 1 and "were in flight when an earlier send stopped" in err
        else:
            assert resumed.returncode == 0, err
        delivered = handler.delivered()
        assert set(delivered) >= set(everyone) - in_flight  # nobody lost
        assert all(n == 1 for n in delivered.values())  # nobody doubled
        again = cli(["send", EXAMPLE, "--resend-uncertain"], env)
        out, err = again.communicate(timeout=60)
        assert again.returncode == 0, err
    delivered = handler.delivered()
    assert set(delivered) == set(everyone)
    doubled = {a for a, n in delivered.items() if n > 1}
    assert doubled <= in_flight  # a second copy only for what the ledger called uncertain, when asked
    for address in doubled:  # and then with the same Message-ID, so the receiver can drop it
        ids = {email.message_from_bytes(r.data)["Message-ID"] for r in handler.received if r.recipient == address}
        assert len(ids) == 1
    with store_of(config) as store:
        assert store.counts(EXAMPLE.stem)["sent"] == 150


@pytest.mark.sqlite_only  # on PostgreSQL two sends split the list (test_store_pg.py)
def test_a_second_send_of_the_same_issue_refuses(tmp_path, cert):
    handler = Handler(delay=0.05)
    with Server(handler, tls=cert) as server:
        env = settings_env(tmp_path, server.port, cert, smtp_connections=1)
        subscribe(config_for(env), addresses(40))
        first = cli(["send", EXAMPLE], env)
        wait_for(lambda: len(handler.received) >= 2)
        second = cli(["send", EXAMPLE], env)
        out, err = second.communicate(timeout=30)
        assert second.returncode == 2
        assert f"another `newsletter send` of {EXAMPLE.stem} is running (pid {first.pid})" in err
        first.send_signal(signal.SIGTERM)  # stops cleanly after the message in flight
        out, err = first.communicate(timeout=30)
        assert "stopped: stopped by SIGTERM" in err
        with store_of(config_for(env)) as store:
            counts = store.counts(EXAMPLE.stem)
        assert counts["sending"] == 0 and counts["sent"] == len(handler.received) < 40
        assert first.returncode == 75  # EX_TEMPFAIL: the rest waits for the next run


def test_cli_summary_status_and_exit_codes(tmp_path, cert):
    handler = Handler(script={"r2@example.com": ["550 5.1.1 No such user"]})
    with Server(handler, tls=cert) as server:
        env = settings_env(tmp_path, server.port, cert)
        subscribe(config_for(env), addresses(4))
        run = cli(["send", EXAMPLE], env)
        out, err = run.communicate(timeout=60)
        assert run.returncode == 1, err  # something failed
        assert f"{EXAMPLE.stem}: sent 3, deferred 0, failed 1, uncertain 0, skipped 0" in out
        assert "Traceback" not in err and PASSWORD not in out + err
        status = cli(["status", EXAMPLE.stem], env)
        out, _ = status.communicate(timeout=30)
        assert "sent      3" in out and "failed: r2@example.com (1 attempt, recipient's fault): 550 5.1.1 No such user" in out


def test_outbox_backend_writes_one_file_per_recipient_through_the_ledger(tmp_path):
    env = settings_env(tmp_path, 1, send_backend="outbox")
    config = config_for(env)
    subscribe(config, addresses(3))
    summary = send_issue(EXAMPLE, config)
    folder = tmp_path / "outbox" / EXAMPLE.stem
    files = sorted(folder.glob("*.eml"))
    assert [f.name for f in files] == ["r0@example.com.eml", "r1@example.com.eml", "r2@example.com.eml"]
    for f in files:
        message = email.message_from_bytes(f.read_bytes(), policy=email.policy.default)
        assert message["To"].addresses[0].addr_spec == f.name.removesuffix(".eml")
    assert summary.counts["sent"] == 3
    stamps = [f.stat().st_mtime_ns for f in files]
    send_issue(EXAMPLE, config)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # nothing written twice


def test_a_send_resumed_after_the_issue_changed_refuses_unless_allowed(tmp_path):
    issue = tmp_path / EXAMPLE.name
    issue.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    config = config_for(settings_env(tmp_path, 1, send_backend="outbox"))
    subscribe(config, addresses(2))
    assert send_issue(issue, config).counts["sent"] == 2
    subscribe(config, ["late@example.com"])
    issue.write_text(issue.read_text(encoding="utf-8").replace("One thing is certain", "One thing is sure"),
                     encoding="utf-8")
    with pytest.raises(StoreError, match="has changed since its send began \\(2 already sent\\)"):
        send_issue(issue, config)
    with store_of(config) as store:
        assert store.counts(EXAMPLE.stem, "outbox")["sent"] == 2  # refused before anything was sent
    summary = send_issue(issue, config, allow_changed=True)
    assert summary.this_run["sent"] == 1 and summary.counts["sent"] == 3
    assert send_issue(issue, config).this_run["sent"] == 0  # the new version is now the send's own


def test_a_bug_in_recording_the_last_message_ends_the_send_instead_of_hanging(tmp_path, cert, monkeypatch):
    """The worker that took the end of the queue with its last outcome must not wait for
    another end when recording that outcome fails."""
    import threading

    from newsletter import sender

    def broken(self, deliveries, outcomes, following=None):
        raise RuntimeError("a bug while recording")

    monkeypatch.setattr(sender._Run, "record", broken)
    handler = Handler()
    with Server(handler, tls=cert) as server:
        config = config_for(settings_env(tmp_path, server.port, cert, smtp_connections=1))
        subscribe(config, addresses(1))
        raised = []
        thread = threading.Thread(target=lambda: raised.append(pytest.raises(RuntimeError, send_issue, EXAMPLE,
                                                                             config)), daemon=True)
        thread.start()
        thread.join(timeout=20)
        assert not thread.is_alive(), "the send hung"
    assert raised and len(handler.received) == 1
    with store_of(config) as store:  # sent, but not recorded as sent: the next run says uncertain
        assert store.counts(EXAMPLE.stem)["sending"] == 1
