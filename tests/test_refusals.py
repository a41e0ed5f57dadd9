"""Whose fault a refusal is, against a real SMTP server on loopback: a server that refuses
the sender, the account or the message stops the run with everyone pending and nobody
bounced; only a recipient's own permanent failure suppresses that recipient; the same
refusal over and over trips the breaker; and a proof in the outbox never counts as a
delivery."""

import sqlite3

import pytest

from conftest import EXAMPLE, addresses, config_for, run_cli, store_of, subscribe
from newsletter.errors import SendError, StoreError
from newsletter.sender import send_issue
from newsletter.store import SCHEMA_VERSION, Store
from smtp_server import Handler, Server, make_certificate
from test_send import settings_env

SENDER = "brief@watchman.example"

pytestmark = pytest.mark.usefixtures("store_backend")  # each test on SQLite and on PostgreSQL


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


def ledger(config):
    with store_of(config) as store:
        states = dict(store.db.execute("SELECT email, state FROM deliveries WHERE destination = 'mail'"))
        statuses = dict(store.db.execute("SELECT email, status FROM subscribers"))
        suppressed = {e for (e,) in store.db.execute("SELECT email FROM suppressions")}
    return states, statuses, suppressed


def assert_nobody_harmed(config, everyone, pending=None):
    """Everyone still subscribed, nobody suppressed, and these rows pending."""
    states, statuses, suppressed = ledger(config)
    assert statuses == {a: "subscribed" for a in everyone}
    assert suppressed == set()
    for address in pending if pending is not None else everyone:
        assert states[address] == "pending", address


REFUSALS = {
    # where, the reply, what the stop says to fix
    "sender at RCPT (postfix's 5.1.8)": (
        "refuse_rcpt", f"553 5.1.8 <{SENDER}>: Sender address rejected: Domain not found", "[sender] address"),
    "sender at MAIL FROM": ("refuse_mail", "550 5.7.1 Sender not allowed to send here", "[sender] address"),
    "relay denied at RCPT": ("refuse_rcpt", "554 5.7.1 <r0@example.com>: Relay access denied", "relay"),
    "authentication required": ("refuse_mail", "530 5.7.0 Authentication required", "login"),
    "the message at DATA": ("refuse_data", "554 5.7.1 Message rejected as spam", "the message itself"),
}


@pytest.mark.parametrize("where", REFUSALS)
def test_a_refusal_that_is_not_the_readers_stops_the_run_and_harms_nobody(tmp_path, cert, where):
    attribute, reply, advice = REFUSALS[where]
    handler = Handler()
    setattr(handler, attribute, reply)
    everyone = addresses(12)
    with Server(handler, tls=cert) as server:
        env = settings_env(tmp_path, server.port, cert, smtp_connections=2)
        config = config_for(env)
        subscribe(config, everyone)
        run = run_cli("send", EXAMPLE, env=env)
        assert run.returncode == 2, run.stderr  # the send could not go on: nothing failed for good
        assert advice in run.stderr and reply.split(" ", 1)[1][:30] in run.stderr
        assert handler.received == []
        assert_nobody_harmed(config, everyone)
        # At most one message a connection was tried before the stop: no burning through the
        # list. (Each connection may have sent the next message's envelope behind the first
        # one's content: two envelopes a connection, and no more.)
        assert sum(handler.contents.values()) <= 2 and sum(handler.attempts.values()) <= 4
        # `subscribers add` still takes them: nobody was suppressed.
        assert run_cli("subscribers", "add", everyone[0], env=env).returncode == 0

        setattr(handler, attribute, None)  # the setting is fixed
        run = run_cli("send", EXAMPLE, env=env)
        assert run.returncode == 0, run.stderr
    assert handler.delivered() == {a: 1 for a in everyone}
    states, _, _ = ledger(config)
    assert set(states.values()) == {"sent"}


def test_a_refused_greeting_stops_the_run_and_harms_nobody(tmp_path, cert):
    everyone = addresses(5)
    with Server(Handler(), auth=False, greeting="554 5.7.1 Client host [127.0.0.1] blocked using a list") as server:
        env = settings_env(tmp_path, server.port, cert)
        config = config_for(env)
        subscribe(config, everyone)
        with pytest.raises(SendError, match="554 5.7.1 Client host"):
            send_issue(EXAMPLE, config)
        run = run_cli("send", EXAMPLE, env=env)
        assert run.returncode == 2 and "will not talk" in run.stderr
    assert_nobody_harmed(config, everyone)
    handler = Handler()
    with Server(handler, tls=cert) as server:  # the same list, through a server that takes us
        summary = send_issue(EXAMPLE, config_for(settings_env(tmp_path, server.port, cert)))
    assert summary.counts["sent"] == 5 and handler.delivered() == {a: 1 for a in everyone}


def test_only_the_recipients_own_failure_suppresses_them(tmp_path, cert):
    gone = {"r3@example.com": ["550 5.1.1 <r3@example.com>: Recipient address rejected: User unknown"],
            "r7@example.com": ["550 5.2.1 Mailbox disabled"],
            "r8@example.com": ["552 5.2.2 Mailbox full"],
            "r9@example.com": ["550 5.7.1 Recipient address rejected: Access denied"]}
    handler = Handler(script=gone)
    everyone = addresses(12)
    with Server(handler, tls=cert) as server:
        config = config_for(settings_env(tmp_path, server.port, cert, smtp_connections=2))
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
    assert summary.refused is None and summary.stopped is None
    states, statuses, suppressed = ledger(config)
    assert suppressed == {"r3@example.com", "r7@example.com"}  # the mailbox does not exist or is disabled
    assert {a for a, s in statuses.items() if s != "subscribed"} == suppressed
    assert {a for a, s in states.items() if s == "failed"} == set(gone)  # full, or a policy: failed, kept
    assert summary.counts["sent"] == 8 and len(handler.received) == 8
    with store_of(config) as store:
        faults = dict(store.db.execute("SELECT email, fault FROM deliveries WHERE state = 'failed'"))
    assert faults == {"r3@example.com": "recipient", "r7@example.com": "recipient",
                      "r8@example.com": "recipient", "r9@example.com": "server"}


def test_the_breaker_stops_a_run_that_gets_the_same_refusal_for_everyone(tmp_path, cert):
    handler = Handler(refuse_rcpt="550 5.1.1 Recipient address rejected: User unknown in local table")
    everyone = addresses(40)
    with Server(handler, tls=cert) as server:
        env = settings_env(tmp_path, server.port, cert, smtp_connections=1, send_breaker=4)
        config = config_for(env)
        subscribe(config, everyone)
        run = run_cli("send", EXAMPLE, env=env)
        assert run.returncode == 2, run.stderr
        assert "the same answer came back for 4 recipients" in run.stderr
        states, statuses, suppressed = ledger(config)
        assert len(suppressed) == 4 and list(states.values()).count("pending") == 36  # the rest untouched

        # Recovery: put back whom that refusal suppressed, by its reply, and send once it is fixed.
        listed = run_cli("subscribers", "restore", "--reply", "5.1.1", "--dry-run", env=env)
        assert listed.returncode == 0 and listed.stdout.count("550 5.1.1") == 4
        assert ledger(config)[2] == suppressed  # a dry run changes nothing
        restored = run_cli("subscribers", "restore", "--reply", "5.1.1", env=env)
        assert restored.returncode == 0 and "4 address(es) restored" in restored.stderr
        assert_nobody_harmed(config, everyone)
        handler.refuse_rcpt = None
        assert run_cli("send", EXAMPLE, env=env).returncode == 0
    assert handler.delivered() == {a: 1 for a in everyone}


def test_restore_never_lifts_an_unsubscribe_or_every_suppression_at_once(tmp_path):
    config = config_for(settings_env(tmp_path, 1))
    subscribe(config, addresses(3))
    with store_of(config) as store:
        store.suppress("r0@example.com", "550 5.1.1 no such user")
        store.set_status("r0@example.com", "bounced", "send")
        store.suppress("r1@example.com", "complaint")
        store.set_status("r1@example.com", "complained", "webhook")
        store.suppress("r2@example.com", "550 5.1.1 no such user")
        store.set_status("r2@example.com", "unsubscribed", "cli remove")
    env = settings_env(tmp_path, 1)
    assert run_cli("subscribers", "restore", env=env).returncode == 2  # no filter: refused
    assert run_cli("subscribers", "restore", "--since", "not a time", env=env).returncode == 2
    run = run_cli("subscribers", "restore", "--reply", "5.1.1", "--since", "2000-01-01", env=env)
    assert run.returncode == 0
    _, statuses, suppressed = ledger(config)
    assert suppressed == {"r1@example.com"}
    assert statuses == {"r0@example.com": "subscribed", "r1@example.com": "complained",
                        "r2@example.com": "unsubscribed"}
    assert run_cli("subscribers", "restore", "--until", "2000-01-01", env=env).returncode == 1  # none matched


def test_the_readme_first_command_then_a_real_send_reaches_everyone_once(tmp_path, cert):
    handler = Handler()
    everyone = addresses(6)
    with Server(handler, tls=cert) as server:
        env = settings_env(tmp_path, server.port, cert, send_backend="outbox")
        subscribe(config_for(env), everyone)
        proof = run_cli("send", EXAMPLE, env=env)  # the README's first command: the outbox
        assert proof.returncode == 0 and "proofs" in proof.stdout
        assert len(list((tmp_path / "outbox" / EXAMPLE.stem).glob("*.eml"))) == 6
        real = run_cli("send", EXAMPLE, "--backend", "smtp", env=env)
        assert real.returncode == 0, real.stderr
        assert handler.delivered() == {a: 1 for a in everyone}
        again = run_cli("send", EXAMPLE, "--backend", "smtp", env=env)
        assert again.returncode == 0 and f"{EXAMPLE.stem}: sent 0" in again.stdout
        assert handler.delivered() == {a: 1 for a in everyone}
        status = run_cli("status", EXAMPLE.stem, env=env)
    assert "delivered by mail: 6 recipient(s)" in status.stdout and "sent via smtp 6" in status.stdout
    assert "proofs in the outbox (never counted as delivered): 6 recipient(s)" in status.stdout


def test_a_store_from_before_destinations_is_upgraded_in_place(tmp_path):
    """Version 0 had one ledger: outbox rows are told apart by their reply."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE subscribers (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE COLLATE NOCASE, name TEXT,
            fields TEXT, status TEXT NOT NULL DEFAULT 'subscribed', changed_at TEXT NOT NULL,
            changed_how TEXT NOT NULL);
        CREATE TABLE suppressions (email TEXT PRIMARY KEY COLLATE NOCASE, reason TEXT NOT NULL,
            created_at TEXT NOT NULL);
        CREATE TABLE deliveries (id INTEGER PRIMARY KEY, issue TEXT NOT NULL, email TEXT NOT NULL COLLATE NOCASE,
            name TEXT, fields TEXT, rkey TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER
            NOT NULL DEFAULT 0, reply TEXT, next_try REAL NOT NULL DEFAULT 0, updated_at TEXT NOT NULL,
            UNIQUE (issue, email));
        CREATE INDEX deliveries_by_issue ON deliveries (issue, id);
        CREATE TABLE sends (issue TEXT PRIMARY KEY, digest TEXT NOT NULL, started_at TEXT NOT NULL);
        INSERT INTO deliveries (issue, email, rkey, state, reply, updated_at) VALUES
            ('a', 'x@example.com', 'k1', 'sent', 'written to outbox/a/x@example.com.eml', 't'),
            ('b', 'x@example.com', 'k1', 'sent', '250 2.0.0 Ok: queued', 't');
        INSERT INTO sends VALUES ('b', 'abc', 't');
    """)
    db.close()
    with Store(path) as store:
        assert store.counts("a", "outbox")["sent"] == 1 and store.counts("a")["sent"] == 0
        assert store.counts("b")["sent"] == 1
        assert store.send_digest("b", "abc", "b.yaml") == ("abc", None)
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with Store(path) as store:  # opening it again changes nothing
        assert store.counts("b")["sent"] == 1


def test_two_issue_files_of_the_same_name_never_share_a_ledger(tmp_path):
    config = config_for(settings_env(tmp_path, 1, send_backend="outbox"))
    subscribe(config, addresses(3))
    first = tmp_path / "a" / EXAMPLE.name
    other = tmp_path / "b" / EXAMPLE.name
    for path in (first, other):
        path.parent.mkdir()
        path.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    other.write_text(other.read_text(encoding="utf-8").replace("One thing is certain", "Another issue"),
                     encoding="utf-8")
    assert send_issue(first, config).counts["sent"] == 3
    with pytest.raises(StoreError, match=f"another issue file named {EXAMPLE.stem} .* has already been sent"):
        send_issue(other, config)
    # The same issue moved to another folder is the same send: it resumes, sending nobody twice.
    moved = tmp_path / "c" / EXAMPLE.name
    moved.parent.mkdir()
    first.rename(moved)
    subscribe(config, ["late@example.com"])
    summary = send_issue(moved, config)
    assert summary.this_run["sent"] == 1 and summary.counts["sent"] == 4


def test_two_processes_opening_an_old_store_at_once_upgrade_it_once(tmp_path, monkeypatch):
    """`serve` and `send` may open a version-0 store together: the one that waits for the
    other's upgrade must not run the version-0 migration again over the upgraded ledger."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE deliveries (id INTEGER PRIMARY KEY, issue TEXT NOT NULL, email TEXT NOT NULL COLLATE NOCASE,
            name TEXT, fields TEXT, rkey TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER
            NOT NULL DEFAULT 0, reply TEXT, next_try REAL NOT NULL DEFAULT 0, updated_at TEXT NOT NULL,
            UNIQUE (issue, email));
        CREATE TABLE sends (issue TEXT PRIMARY KEY, digest TEXT NOT NULL, started_at TEXT NOT NULL);
    """)
    db.close()
    real_connect = sqlite3.connect
    raced = []

    from newsletter.store import _Connection

    class Late(_Connection):  # the store's own connection class (SQLite errors as StoreError), late
        """Reads the schema's version, and only then lets the other process upgrade and write."""

        def execute(self, sql, *args):
            if sql == "PRAGMA user_version" and not raced:
                raced.append(super().execute(sql).fetchone()[0])
                monkeypatch.setattr(sqlite3, "connect", real_connect)
                with Store(path) as other:  # the other process: upgrades, then a proof is pending
                    other.db.execute("INSERT INTO deliveries (issue, destination, email, rkey, state, fault, via,"
                                     " updated_at) VALUES ('a', 'outbox', 'x@example.com', 'k', 'pending', 'server',"
                                     " 'outbox', 't')")
                return super().execute("SELECT ?", (raced[0],))
            return super().execute(sql, *args)

    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: real_connect(*a, **{**k, "factory": Late}))
    with Store(path) as store:
        assert raced == [0]
        assert store.counts("a", "outbox")["pending"] == 1 and store.counts("a")["pending"] == 0
        assert store.db.execute("SELECT fault, via FROM deliveries").fetchall() == [("server", "outbox")]
        assert store.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'deliveries_by_send'").fetchone()
