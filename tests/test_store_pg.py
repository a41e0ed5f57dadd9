"""The store on a real PostgreSQL server (tests/pg_server.py): several senders of one issue
splitting the list, one of them killed, `serve` and `send` seeing each other's changes, the
schema's versions, `store copy` both ways, and the password kept out of the settings.

The rest of the store's behaviour runs on both databases in test_send, test_subscribers,
test_events and test_refusals (the store_backend fixture)."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import EXAMPLE, ROOT, addresses, config_for, run_cli, store_of, subscribe
from newsletter.errors import StoreError
from newsletter.recipients import Recipient
from newsletter.store import SCHEMA_VERSION, TABLES, Store, open_at
from newsletter.tokens import Signer
from smtp_server import Handler, Server
from test_send import cert, settings_env  # noqa: F401 (cert: a fixture)
from test_serve import FORM, ONE_CLICK, Service

@pytest.fixture
def pg_store(pg_server, monkeypatch):
    """A database of this test's own; its URL in NEWSLETTER_STORE_URL for config_for and run_cli."""
    import conftest
    monkeypatch.setenv("PGPASSWORD", pg_server.env()["PGPASSWORD"])
    conftest._STORE_URL["url"] = pg_server.new_database()
    yield conftest._STORE_URL["url"]
    conftest._STORE_URL["url"] = None


def send_process(env):
    return subprocess.Popen([sys.executable, "-m", "newsletter", "send", str(EXAMPLE)], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def ledger(config) -> dict[str, str]:
    with store_of(config) as store:
        return dict(store.db.execute("SELECT email, state FROM deliveries WHERE destination = 'mail'"))


def sent_line(out: str) -> int:
    line = next(l for l in out.splitlines() if l.startswith(f"{EXAMPLE.stem}: sent "))
    return int(line.split("sent ")[1].split(",")[0])


def test_two_senders_split_the_list_and_each_reader_gets_one_message(tmp_path, cert, pg_store):
    handler = Handler(delay=0.005)
    everyone = addresses(300)
    with Server(handler, tls=cert) as server:
        env = {**settings_env(tmp_path, server.port, cert, smtp_connections=2), "NEWSLETTER_STORE_URL": pg_store}
        subscribe(config_for(env), everyone)
        first, second = send_process(env), send_process(env)
        (out1, err1), (out2, err2) = first.communicate(timeout=120), second.communicate(timeout=120)
    assert (first.returncode, second.returncode) == (0, 0), err1 + err2
    got = [m.recipient for m in handler.received]
    assert sorted(got) == sorted(everyone)  # each once
    sent1, sent2 = sent_line(out1), sent_line(out2)
    assert sent1 + sent2 == 300 and sent1 > 0 and sent2 > 0  # they shared the work, neither refused
    assert set(ledger(config_for(env)).values()) == {"sent"}


def test_a_sender_killed_beside_another_loses_nobody_and_sends_nobody_twice(tmp_path, cert, pg_store):
    handler = Handler(delay=0.01)
    everyone = addresses(400)
    with Server(handler, tls=cert) as server:
        env = {**settings_env(tmp_path, server.port, cert, smtp_connections=2), "NEWSLETTER_STORE_URL": pg_store}
        config = config_for(env)
        subscribe(config, everyone)
        doomed, survivor = send_process(env), send_process(env)
        wait_for(lambda: len(handler.received) >= 60)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)
        out, err = survivor.communicate(timeout=120)
        time.sleep(0.3)  # the server finishes what the killed one was in the middle of
        # the survivor took over the dead one's claims; a run afterwards finds nothing left
        after = run_cli("send", EXAMPLE, env=env)
    states = ledger(config)
    uncertain = {e for e, s in states.items() if s == "uncertain"}
    assert survivor.returncode in (0, 1), err  # 1: it reports the dead run's uncertain rows
    assert "Traceback" not in err + after.stderr
    assert len(uncertain) <= 2  # at most one in flight per connection of the killed sender
    assert {e for e, s in states.items() if s != "sent"} == uncertain
    counts = {}
    for message in handler.received:
        counts[message.recipient] = counts.get(message.recipient, 0) + 1
    assert all(n == 1 for n in counts.values()), {e: n for e, n in counts.items() if n > 1}
    assert set(everyone) - set(counts) <= uncertain  # nobody lost but the uncertain, who got 0 or 1
    if uncertain:
        assert "may have been delivered" in out + after.stdout + after.stderr or after.returncode == 1


def test_a_store_lost_mid_send_stops_it_with_the_ledger_true_and_a_resend_finishes(tmp_path, cert, pg_store):
    """The database drops the send's connections while messages go out: the send stops
    with a plain error, no message went out without its `sending` commit (none received
    is pending), and the next send reports the rows in flight and sends the rest once."""
    handler = Handler(delay=0.005)
    everyone = addresses(300)
    with Server(handler, tls=cert) as server:
        env = {**settings_env(tmp_path, server.port, cert, smtp_connections=3), "NEWSLETTER_STORE_URL": pg_store}
        config = config_for(env)
        subscribe(config, everyone)
        sending = send_process(env)
        wait_for(lambda: len(handler.received) >= 40)
        with open_at(pg_store) as other:
            other.db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE application_name = 'newsletter send'")
        out, err = sending.communicate(timeout=120)
        time.sleep(0.3)  # the server finishes what was on the wire
        stopped = ledger(config)
        received_then = {m.recipient for m in handler.received}
        after = run_cli("send", EXAMPLE, env=env)
    assert sending.returncode == 2 and "Traceback" not in err and "the store failed" in err, err
    assert 40 <= len(received_then) < 300
    assert all(stopped[e] in ("sent", "sending") for e in received_then)  # nothing went out unrecorded
    assert sum(state == "sending" for state in stopped.values()) <= 3  # one in flight a connection at most
    states = ledger(config)
    uncertain = {e for e, state in states.items() if state == "uncertain"}
    assert after.returncode == 1 and "Traceback" not in after.stderr  # 1: it reports the uncertain rows
    assert uncertain == {e for e, state in stopped.items() if state == "sending"}
    assert {e for e, state in states.items() if state != "sent"} == uncertain
    counts = handler.delivered()
    assert all(n == 1 for n in counts.values()), {e: n for e, n in counts.items() if n > 1}
    assert set(everyone) - set(counts) <= uncertain


def test_serve_answers_webhooks_on_its_one_connection_to_the_database(tmp_path, pg_store):
    """Postmark posts one event a request: each used to open a connection of its own (a
    new server process each, on PostgreSQL). serve's store thread keeps one for them all."""
    import httpx
    from test_webhooks import PEOPLE, POSTMARK, make_config, message_id
    from webhook_service import Service as InProcessService

    def sessions_so_far() -> int:  # this look is a session too
        with open_at(pg_store) as store:
            return store.db.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
                                    ).fetchone()[0]

    config = make_config(tmp_path, postmark_username=POSTMARK[0], postmark_password=POSTMARK[1])
    with InProcessService(config) as running, httpx.Client(base_url=running.url, timeout=20) as client:
        before = sessions_so_far()
        for i in range(20):
            soft = {"RecordType": "Bounce", "ID": i + 1, "Type": "SoftBounce", "TypeCode": 4096,
                    "Email": PEOPLE[i % len(PEOPLE)], "Details": "smtp;452 4.2.2 mailbox full",
                    "Metadata": {"message_id": message_id(PEOPLE[i % len(PEOPLE)])}}
            assert client.post("/webhooks/postmark", json=soft, auth=POSTMARK).status_code == 200
        hard = {"RecordType": "Bounce", "ID": 99, "Type": "HardBounce", "TypeCode": 1, "Email": PEOPLE[0],
                "Details": "smtp;550 5.1.1 no such user", "Metadata": {"message_id": message_id(PEOPLE[0])}}
        assert client.post("/webhooks/postmark", json=hard, auth=POSTMARK).json() == {"events": 1, "changed": 1}
        time.sleep(0.5)  # a closed session's count reaches the statistics as its process exits
        opened = sessions_so_far() - before
    assert opened <= 3  # the store thread's, and this test's own looks: not one a request
    with open_at(pg_store) as store:
        assert store.suppressed(PEOPLE[0]) and store.status(PEOPLE[0]) == "bounced"


def test_an_unsubscribe_through_serve_is_honoured_by_the_running_send(tmp_path, cert, pg_store, pg_server):
    handler = Handler(delay=0.05)
    everyone = addresses(60)
    late = everyone[-1]
    with Server(handler, tls=cert) as server:
        env = {**settings_env(tmp_path, server.port, cert, smtp_connections=1), "NEWSLETTER_STORE_URL": pg_store,
               **pg_server.env()}
        config = config_for(env)
        subscribe(config, everyone)
        service = Service(env, tmp_path)
        try:
            sending = send_process(env)
            wait_for(lambda: len(handler.received) >= 3)
            signer = Signer(config.send.secret.encode(), config.publication.list_id)
            answer = service.client.post(f"/unsubscribe/{signer.token(signer.recipient_key(late))}",
                                         content=ONE_CLICK, headers={"content-type": FORM})
            assert answer.status_code == 200
            out, err = sending.communicate(timeout=120)
        finally:
            service.stop()
    assert sending.returncode == 0, err
    assert late not in {m.recipient for m in handler.received}
    assert ledger(config)[late] == "skipped"
    assert "skipped 1" in out


def test_a_store_older_than_the_tool_waits_for_migrate_and_a_newer_one_is_refused(pg_store, monkeypatch):
    from newsletter import store_pg
    with open_at(pg_store) as store:
        store.db.execute(f"UPDATE newsletter_schema SET version = {SCHEMA_VERSION - 1}")
        store.db.execute("ALTER TABLE deliveries DROP COLUMN claimed_by")
    env = {"NEWSLETTER_STORE_URL": pg_store}
    refused = run_cli("status", EXAMPLE.stem, env=env)
    assert refused.returncode == 2
    assert "run `newsletter store migrate`" in refused.stderr and f"schema {SCHEMA_VERSION - 1}" in refused.stderr
    # the upgrade to this version, as a later version's migration would be written
    monkeypatch.setitem(store_pg.MIGRATIONS, SCHEMA_VERSION - 1, "ALTER TABLE deliveries ADD COLUMN claimed_by BIGINT")
    with store_pg.PostgresStore(pg_store, migrating=True) as store:
        assert store.migrate() == (SCHEMA_VERSION - 1, SCHEMA_VERSION)
        assert store.migrate() == (None, SCHEMA_VERSION)
    assert run_cli("status", EXAMPLE.stem, env=env).returncode == 0
    migrated = run_cli("store", "migrate", env=env)
    assert migrated.returncode == 0 and f"schema {SCHEMA_VERSION}, already this newsletter's" in migrated.stdout

    with open_at(pg_store) as store:
        store.db.execute(f"UPDATE newsletter_schema SET version = {SCHEMA_VERSION + 1}")
    for args in (("status", EXAMPLE.stem), ("subscribers", "add", "a@example.com"), ("store", "migrate")):
        newer = run_cli(*args, env=env)
        assert newer.returncode == 2 and "made by a newer newsletter" in newer.stderr, args


def test_a_sqlite_store_is_upgraded_when_opened_and_refused_when_newer(tmp_path):
    """The embedded store's upgrade, for comparison: as it is opened, by any command."""
    path = tmp_path / "store.sqlite3"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE deliveries DROP COLUMN claimed_by")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    migrated = run_cli("store", "migrate", env={"NEWSLETTER_STORE_PATH": str(path)})
    assert migrated.returncode == 0 and "schema 2 upgraded to 3" in migrated.stdout, migrated.stderr
    db = sqlite3.connect(path)
    assert "claimed_by" in {row[1] for row in db.execute("PRAGMA table_info(deliveries)")}
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    newer = run_cli("subscribers", "list", env={"NEWSLETTER_STORE_PATH": str(path)})
    assert newer.returncode == 2 and "made by a newer newsletter (schema 99" in newer.stderr


def dump(store) -> dict[str, list[tuple]]:
    """Every row of every table, in a form both databases give alike."""
    found = {}
    for table, columns in TABLES.items():
        rows = store.db.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()
        found[table] = sorted(tuple(str(v) if v is not None else None for v in row) for row in rows)
    return found


def test_store_copy_moves_everything_to_postgresql_and_back(tmp_path, pg_store):
    sqlite_env = {**settings_env(tmp_path, 1, send_backend="outbox")}
    sqlite_env.pop("NEWSLETTER_STORE_URL", None)
    source = tmp_path / "store.sqlite3"
    with Store(source) as store:
        store.add(Recipient("ada@example.com", "Ada", {"city": "London"}), "test")
        store.add(Recipient("Bob@Example.com", "Bob"), "test")
        store.add(Recipient("cy@example.com"), "test")
        store.set_status("cy@example.com", "unsubscribed", "test")
        store.suppress("eve@example.com", "hard bounce 5.1.1")
    import conftest
    url, conftest._STORE_URL["url"] = conftest._STORE_URL["url"], None  # the send: on SQLite
    try:
        assert run_cli("send", EXAMPLE, env=sqlite_env).returncode == 0  # proofs: ledger rows and a send
    finally:
        conftest._STORE_URL["url"] = url
    with Store(source) as store:
        from newsletter.outcome import Event
        store.record_event(Event("unsubscribe", "ada@example.com", source="test", event_id="e1"))
        before = dump(store)
    assert all(before[t] for t in ("subscribers", "suppressions", "deliveries", "sends", "events"))

    copied = run_cli("store", "copy", source, pg_store)
    assert copied.returncode == 0, copied.stderr
    assert "counts checked" in copied.stdout and "deliveries   2" in copied.stdout
    with open_at(pg_store) as store:
        assert dump(store) == before
    again = run_cli("store", "copy", source, pg_store)  # into a store that is not empty
    assert again.returncode == 2 and "is not empty" in again.stderr

    # the copy is a working store: a new reader and a send on PostgreSQL carry on from it
    pg_env = {**sqlite_env, "NEWSLETTER_STORE_URL": pg_store}
    assert run_cli("subscribers", "add", "dee@example.com", env=pg_env).returncode == 0
    assert run_cli("send", EXAMPLE, env=pg_env).returncode == 0
    with open_at(pg_store) as store:
        assert store.counts(EXAMPLE.stem, "outbox")["sent"] == 3  # ada and bob before the copy, dee after
        ids = {e.lower(): i for e, i in store.db.execute("SELECT email, id FROM deliveries")}
        assert ids["dee@example.com"] > max(ids["ada@example.com"], ids["bob@example.com"])  # ids go on
        moved = dump(store)
    back = tmp_path / "back.sqlite3"
    assert run_cli("store", "copy", pg_store, back).returncode == 0
    with Store(back) as store:
        assert dump(store) == moved
    info = run_cli("store", "info", env=pg_env)
    assert info.returncode == 0 and f"schema {SCHEMA_VERSION}" in info.stdout and "PostgreSQL" in info.stdout


def test_the_password_never_comes_from_the_settings(tmp_path, pg_store, pg_server):
    with_password = pg_store.replace("newsletter@", "newsletter:hunter2-in-the-file@")
    refused = run_cli("subscribers", "list", env={"NEWSLETTER_STORE_URL": with_password})
    assert refused.returncode == 2 and "never read from the settings" in refused.stderr
    assert "hunter2-in-the-file" not in refused.stdout + refused.stderr
    wrong = run_cli("subscribers", "list", env={"NEWSLETTER_STORE_URL": pg_store, "PGPASSWORD": "wrong-marker-pw"})
    assert wrong.returncode == 2 and "cannot connect to the store" in wrong.stderr
    assert "wrong-marker-pw" not in wrong.stdout + wrong.stderr
    service = tmp_path / "pg_service.conf"
    host, port = pg_store.split("@")[1].split("/")[0].split(":")
    service.write_text(f"[news]\nhost={host}\nport={port}\nuser=newsletter\ndbname={pg_store.rsplit('/', 1)[1]}\n"
                       f"password={pg_server.env()['PGPASSWORD']}\n")
    through_service = run_cli("subscribers", "add", "a@example.com",
                              env={"NEWSLETTER_STORE_URL": "postgresql:///?service=news", "PGSERVICEFILE": str(service),
                                   "PGPASSWORD": ""})
    assert through_service.returncode == 0, through_service.stderr


def test_the_same_address_in_another_case_is_the_same_reader(pg_store):
    with open_at(pg_store) as store:
        assert store.add(Recipient("Ada@Example.com"), "test") == "added"
        assert store.add(Recipient("ada@example.com"), "test") == "updated"
        store.suppress("EVE@example.com", "complaint")
        assert store.suppressed("eve@EXAMPLE.com")
        assert store.blocked(["Eve@Example.com", "ada@example.com"]) == {"eve@example.com"}
        with pytest.raises(StoreError, match="is not empty"):
            from newsletter.store import copy_store
            with Store(":memory:") as empty:
                copy_store(empty, store)


def test_a_claimed_row_is_claimed_once_until_it_is_deferred_or_its_run_is_gone(pg_store):
    from newsletter.store_pg import PostgresStore
    with PostgresStore(pg_store) as one, PostgresStore(pg_store) as two:
        for address in addresses(6):
            one.add(Recipient(address), "test")
        one.enqueue_subscribers("issue", lambda e: "k" + e)
        with two.sender_lock("issue"):
            with one.sender_lock("issue"):
                first = one.claim("issue", 4)
                assert [d.email for d in first] == addresses(4)
                assert [d.email for d in one.claim("issue", 4)] == addresses(6)[4:]
                assert one.claim("issue", 4) == []  # its own claims: never twice
                assert two.claim("issue", 10) == []  # all claimed by the live `one`
                one.mark_many([first[0].id], "deferred", reply="451 later", next_try=0)
                assert [d.email for d in two.claim("issue", 10)] == [first[0].email]  # deferred: anybody's
                one.mark_many([first[1].id], "sending")
                assert two.settle_in_flight("issue") == []  # `one` lives: its rows are its own
            # `one` has ended (as a killed run's lock goes with its connection): its claims are
            # freed, and its row in flight is settled as uncertain by the next to look
            assert two.settle_in_flight("issue") == [first[1].email]
            assert [d.email for d in two.claim("issue", 10)] == [first[2].email, first[3].email,
                                                                  *addresses(6)[4:]]
        assert two.counts("issue")["uncertain"] == 1


def test_the_marks_keep_any_reply_exactly_on_both_paths(pg_store):
    """A send's marks reach the server as arrays in PostgreSQL's text form (store_pg.MARKS),
    through Store.write_marks and through a send's ServerLedger (a prepared statement on
    libpq itself): whatever a server replied is stored as it was, and nothing in it can
    end an array's element or the statement. Suppressions go as literals beside them."""
    import asyncio
    from newsletter.store import Mark
    from newsletter.store_pg import PostgresStore
    replies = ["250 2.0.0 Ok: queued as 4Xk2", "it's 100%% done; DROP TABLE deliveries; --", "back\\slash \\' \\\\",
               "%s %(x)s {} ? ARRAY[1]::text[] $1", "naïve 日本 \U0001F4E8", "line\r\nbreak", "nul\x00byte", "'", "",
               '{"a",b}', "NULL", "  padded  ", 'quote " and \\" and ""', "a,b", "}", "{", "\\", '"']
    with PostgresStore(pg_store) as store:
        for i in range(2 * len(replies)):
            store.add(Recipient(f"r{i}@example.com"), "test")
        store.enqueue_subscribers("issue", lambda e: "k" + e)
        ids = [d.id for d in store.due("issue", 100)]
        store.write_marks([Mark(i, "failed", reply, 1.5, "recipient", "smtp", 1) for i, reply in zip(ids, replies)],
                          suppress=[("r0@example.com", replies[1])])
        with store.sender_lock("issue"):
            async def through_a_sends_ledger():
                ledger = await store.send_ledger()
                try:
                    written = [ledger.write([Mark(i, "failed", reply, 1.5, "recipient", "smtp", 1)],
                                            [("r1@example.com", reply)] if reply == replies[9] else [])
                               for i, reply in zip(ids[len(replies):], replies)]
                    await ledger.flush()
                    assert all(w.exception() is None for w in written)
                finally:
                    await ledger.close()
            asyncio.run(through_a_sends_ledger())
        got = dict(store.db.execute("SELECT id, reply FROM deliveries"))
        assert store.counts("issue")["failed"] == 2 * len(replies)
        reasons = dict(store.db.execute("SELECT email::text, reason FROM suppressions"))
    stored = [r.replace("\x00", "\ufffd") for r in replies]
    assert [got[i] for i in ids] == stored + stored
    assert reasons == {"r0@example.com": replies[1], "r1@example.com": replies[9]}


# -- from the review of the store: each of these failed before its fix ------------------------------

def terminate(url, pid):
    with open_at(url) as other:
        other.db.execute(f"SELECT pg_terminate_backend({int(pid)})")


def test_a_run_whose_first_connection_is_lost_is_alive_while_its_writers_are(pg_store):
    import asyncio
    from newsletter.store import Mark
    from newsletter.store_pg import PostgresStore
    with PostgresStore(pg_store) as one, PostgresStore(pg_store) as two:
        for address in addresses(4):
            one.add(Recipient(address), "test")
        one.enqueue_subscribers("issue", lambda e: "k" + e)
        with pytest.raises(StoreError), one.sender_lock("issue"):
            rows = one.claim("issue", 4)
            one.mark_many([rows[0].id], "sending")

            async def with_its_ledger():
                ledger = await one.send_ledger()
                try:
                    terminate(pg_store, one.db.conn.info.backend_pid)  # the run's first connection
                    assert two.settle_in_flight("issue") == []  # its ledger's connections live: not taken for dead
                    assert two.claim("issue", 4) == []
                    await ledger.write([Mark(rows[0].id, "sent", "250 ok")])
                finally:
                    await ledger.close()
            asyncio.run(with_its_ledger())
            one.claim("issue", 4)  # its first connection is gone: a StoreError, and the run ends
        # every connection of `one` is closed now (the server lets go of its lock once their
        # backends have exited): its claims are freed
        freed = []

        def settled():
            assert two.settle_in_flight("issue") == []  # nothing was left in flight: its row was marked sent
            freed.extend(d.email for d in two.claim("issue", 4))
            return freed
        wait_for(settled, timeout=10)
        assert freed == addresses(4)[1:]


def test_a_sends_ledger_commits_marks_in_order_and_none_after_one_failed(pg_store):
    """ServerLedger: marks written while a commit is on its way go in the next one, in the
    order they were written; once a commit has failed (its connection lost), every later
    write fails too, and flush says so: no mark may land after one that did not."""
    import asyncio
    from newsletter.store import Mark
    from newsletter.store_pg import PostgresStore
    with PostgresStore(pg_store) as store:
        for address in addresses(6):
            store.add(Recipient(address), "test")
        store.enqueue_subscribers("issue", lambda e: "k" + e)
        with store.sender_lock("issue"):
            a, b, c, d, e, f = [row.id for row in store.claim("issue", 6)]

            async def run():
                ledger = await store.send_ledger()
                try:
                    first = ledger.write([Mark(a, "sending", via="smtp", attempt=1)])
                    await asyncio.sleep(0)  # its commit is on its way
                    written = [ledger.write([Mark(a, "sent", "250 a"), Mark(b, "sending", via="smtp", attempt=1)]),
                               ledger.write([Mark(c, "sending", via="smtp", attempt=1)]),
                               ledger.write([Mark(c, "deferred", "421 later", 5.0, "server")])]
                    await first
                    assert not any(w.done() for w in written)  # they waited for it: in the next commit
                    await ledger.flush()
                    assert all(w.done() and w.exception() is None for w in written)
                    writer_pid = (await (await ledger.writer.execute("SELECT pg_backend_pid()")).fetchone())[0]
                    terminate(pg_store, writer_pid)
                    lost = ledger.write([Mark(d, "sending", via="smtp", attempt=1)])
                    with pytest.raises(StoreError, match="the store failed"):
                        await lost
                    after = ledger.write([Mark(e, "sent", "250 e")])
                    assert after.done() and isinstance(after.exception(), StoreError)
                    with pytest.raises(StoreError):
                        await ledger.flush()
                finally:
                    await ledger.close()
            asyncio.run(run())
            rows = dict(store.db.execute("SELECT id, state || ' ' || coalesce(reply, '') || ' ' || attempts"
                                         " || ' ' || (claimed_by IS NOT NULL) FROM deliveries"))
    assert [rows[i] for i in (a, b, c, d, e, f)] == [
        "sent 250 a 1 true", "sending  1 true", "deferred 421 later 1 false", "pending  0 true", "pending  0 true",
        "pending  0 true"]


def test_a_commit_the_server_refuses_stops_the_send_in_its_own_words(tmp_path, cert, pg_store):
    """The server refuses a commit of the send's marks (here a trigger; in life a disk full,
    a standby after a failover): the send stops with the server's message (libpq's own
    text began "ERROR:  "), the row whose `sending` was refused is never delivered, and
    nothing the server received is pending."""
    handler = Handler()
    everyone = addresses(12)
    with Server(handler, tls=cert) as server:
        env = {**settings_env(tmp_path, server.port, cert, smtp_connections=2), "NEWSLETTER_STORE_URL": pg_store}
        config = config_for(env)
        subscribe(config, everyone)
        with store_of(config) as store:
            store.db.execute("CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN"
                             " RAISE EXCEPTION 'no room for the mark of %', NEW.email; END $$ LANGUAGE plpgsql")
            store.db.execute("CREATE TRIGGER refuse BEFORE UPDATE ON deliveries FOR EACH ROW WHEN"
                             " (NEW.state = 'sending' AND NEW.email = 'r5@example.com') EXECUTE FUNCTION refuse()")
        sending = send_process(env)
        out, err = sending.communicate(timeout=60)
        time.sleep(0.3)  # the server finishes what was on the wire
    states = ledger(config)
    received = {m.recipient for m in handler.received}
    assert sending.returncode == 2 and "Traceback" not in err, err
    assert "the store failed: no room for the mark of r5@example.com" in err, err
    assert "r5@example.com" not in received and states["r5@example.com"] == "pending"
    assert all(states[e] in ("sent", "sending") for e in received)
    assert sum(state == "sending" for state in states.values()) <= 2


def test_a_deferral_with_no_end_is_written_and_the_send_ends(tmp_path, cert, pg_store):
    """send.retry_delay = inf (Seconds takes it), or a provider's X-RateLimit-Reset of inf:
    a deferred row's next try is infinite. SQLite stores it; store_pg._literal had no
    literal for it, and the TypeError killed ServerLedger's commit loop, so that no later
    write was ever done: the send hung for ever."""
    handler = Handler(script={"r1@example.com": ["451 4.7.1 try later"]})
    everyone = addresses(3)
    with Server(handler, tls=cert) as server:
        env = {**settings_env(tmp_path, server.port, cert, send_retry_delay="inf"), "NEWSLETTER_STORE_URL": pg_store}
        config = config_for(env)
        subscribe(config, everyone)
        sending = send_process(env)
        try:
            out, err = sending.communicate(timeout=60)
        finally:
            if sending.poll() is None:
                sending.kill()
                sending.communicate()
    assert "Traceback" not in err and "deferred messages are due in inf s" in err, err
    assert sending.returncode == 75, err  # as on SQLite: the deferred row waits for a later run
    assert ledger(config) == {"r0@example.com": "sent", "r1@example.com": "deferred", "r2@example.com": "sent"}
    with store_of(config) as store:
        assert store.db.execute("SELECT next_try FROM deliveries WHERE email = 'r1@example.com'").fetchone()[0] == \
            float("inf")


def test_a_lost_connection_keeps_the_error_that_stopped_the_run(pg_store):
    from newsletter.store_pg import PostgresStore
    with PostgresStore(pg_store) as store:
        with pytest.raises(ZeroDivisionError):  # not the cleanup's own StoreError
            with store.sender_lock("issue"), store.startup_lock("issue"):
                terminate(pg_store, store.db.conn.info.backend_pid)
                1 / 0
        assert store.run_id is None


def test_a_reply_with_a_lone_surrogate_is_stored_not_a_traceback(pg_store):
    from newsletter.store import Mark
    from newsletter.store_pg import PostgresStore
    with PostgresStore(pg_store) as store:
        store.add(Recipient("a@example.com"), "test")
        store.enqueue_subscribers("issue", lambda e: "k" + e)
        (row,) = store.due("issue", 10)
        store.write_marks([Mark(row.id, "failed", "550 \ud800 refused")])
        assert store.db.execute("SELECT reply FROM deliveries").fetchone()[0] == "550 ? refused"
        store.mark_many([row.id], "failed", "550 \udc80 again")  # the direct path too
        assert store.db.execute("SELECT reply FROM deliveries").fetchone()[0] == "550 ? again"


def test_a_store_with_messages_in_flight_is_not_copied(tmp_path, pg_store):
    source = tmp_path / "store.sqlite3"
    with Store(source) as store:
        store.add(Recipient("a@example.com"), "test")
        store.enqueue_subscribers("issue", lambda e: "k" + e)
        store.mark_many([d.id for d in store.due("issue", 10)], "sending")
    refused = run_cli("store", "copy", source, pg_store)
    assert refused.returncode == 2 and "in flight" in refused.stderr
    with open_at(pg_store) as target:
        assert target.db.execute("SELECT count(*) FROM subscribers").fetchone()[0] == 0  # nothing kept


def test_a_password_hidden_in_the_query_is_refused_and_never_shown(pg_store, pg_server):
    hidden = pg_store + "?pass%77ord=" + pg_server.env()["PGPASSWORD"]
    for args, env in ((("subscribers", "list"), {"NEWSLETTER_STORE_URL": hidden, "PGPASSWORD": ""}),
                      (("store", "copy", hidden, "/nonexistent/x.sqlite3"), {})):
        result = run_cli(*args, env=env)
        assert result.returncode == 2 and "password" in result.stderr
        assert pg_server.env()["PGPASSWORD"] not in result.stdout + result.stderr


def test_serve_opens_the_store_again_after_the_database_server_dropped_it(pg_store):
    import asyncio
    from newsletter.config import Store as StoreSettings
    from newsletter.web.plumbing import StoreThread
    thread = StoreThread(StoreSettings(path=None, url=pg_store))

    async def calls():
        pid = await thread.call(lambda store: store.db.conn.info.backend_pid)
        terminate(pg_store, pid)
        with pytest.raises(StoreError):
            await thread.call(lambda store: store.status("a@example.com"))
        return await thread.call(lambda store: store.status("a@example.com"))
    assert asyncio.run(calls()) is None  # answered again, on a new connection
