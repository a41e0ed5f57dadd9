"""The subscriber store and the `subscribers` commands: addresses, CSV import with every bad
row named, unsubscribes and suppressions honoured, export, and the SQLite file itself."""

import csv
import io
import json
import re
import shutil
import sqlite3

import pytest

from conftest import run_cli as run
from conftest import ROOT, store_env
from newsletter.errors import RecipientsError
from newsletter.recipients import CsvReport, Recipient, address_problem, normalize, read_csv
from newsletter.store import Store, open_at

pytestmark = pytest.mark.usefixtures("store_backend")  # each test on SQLite and on PostgreSQL

EXPORT_HEADER = ["email", "name", "status", "changed_at", "changed_how"]


def rows(folder) -> dict[str, tuple]:
    """email -> (name, fields, status, changed_at, changed_how), read straight from the store's
    database: the SQLite file, or the PostgreSQL database under test."""
    sql = "SELECT email, name, fields, status, changed_at, changed_how FROM subscribers ORDER BY email"
    if url := store_env().get("NEWSLETTER_STORE_URL"):
        with open_at(url) as store:
            return {r[0]: tuple(r[1:]) for r in store.db.execute(sql)}
    path = folder / "newsletter.sqlite3"
    assert path.read_bytes().startswith(b"SQLite format 3\x00")
    db = sqlite3.connect(path)
    try:
        return {r[0]: r[1:] for r in db.execute(sql)}
    finally:
        db.close()


def write(folder, name: str, text: str, bom: bool = False) -> str:
    (folder / name).write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return name


def skipped_lines(stderr: str, name: str) -> list[tuple[int, str, str]]:
    found = []
    for line in stderr.splitlines():
        m = re.fullmatch(re.escape(name) + r":(\d+): skipped '(.*)': (.+)", line)
        if m:
            found.append((int(m.group(1)), m.group(2), m.group(3)))
    return found


# A messy but realistic CSV: BOM, spaces around headers and values, a blank line, a duplicate
# in another case, three invalid rows (physical lines 3, 7 and 9), merge fields.
PEOPLE = (" Email , Name ,city,plan\n"
          " Ada@Example.COM ,  Ada   Lovelace ,London,pro\n"
          "bad@x,Bad,Nowhere,free\n"
          "ADA@example.com,Ada Again,Paris,free\n"
          '"zoe@example.com","Zoë, O\'Brien",Dublin,\n'
          "\n"
          "@x.com,,,\n"
          "bob@example.com,,,\n"
          "a b@example.com,Space,,\n")


# -- addresses ----------------------------------------------------------------------------------

@pytest.mark.parametrize("address", [
    "ada@example.com", "Ada.Lovelace@Example.COM", "first.last+tag@sub.example.co.uk", "o'brien@example.ie",
    "x@a.io", "under_score@example.com", "a-b@my-host.example", "x" * 64 + "@example.com",
    "1234@example.com", "a@" + "b" * 63 + ".com"])
def test_address_problem_accepts_normal_addresses(address):
    assert address_problem(address) is None


@pytest.mark.parametrize("address", [
    "", "x", "a@b", "@x.com", "a@", "a b@example.com", "a@exa_mple.com", "x" * 65 + "@example.com",
    "zoë@example.com", "ada@exämple.com", "a..b@example.com", ".a@example.com", "a.@example.com",
    "a@-example.com", "a@example-.com", "a@example..com", "a@example.com.", "a@example.123",
    "a@[127.0.0.1]", "Ada <ada@example.com>", '"a"@example.com', "a@b@example.com",
    "a@" + "b" * 64 + ".com", "a@" + ("b" * 62 + ".") * 4 + "com"])
def test_address_problem_rejects_bad_addresses(address):
    problem = address_problem(address)
    assert isinstance(problem, str) and problem


def test_normalize_lower_cases_the_domain_only():
    assert normalize(" Ada.Lovelace@Example.COM ") == "Ada.Lovelace@example.com"
    assert normalize("ada@example.com") == "ada@example.com"
    assert normalize("MiXeD+Tag@Sub.EXAMPLE.org") == "MiXeD+Tag@sub.example.org"


# -- read_csv in-process --------------------------------------------------------------------------

def test_read_csv_keeps_fields_reports_bad_rows_and_counts_duplicates_once(tmp_path):
    path = tmp_path / write(tmp_path, "people.csv", PEOPLE, bom=True)
    report = CsvReport()
    got = list(read_csv(path, report))
    assert [r.email for r in got] == ["Ada@example.com", "zoe@example.com", "bob@example.com"]
    assert [r.name for r in got] == ["Ada Lovelace", "Zoë, O'Brien", None]
    assert got[0].fields == {"city": "London", "plan": "pro"}
    assert got[1].fields == {"city": "Dublin", "plan": ""}
    assert report.read == 7
    assert report.duplicates == 1
    assert [(row, value) for row, value, _ in report.invalid] == [(3, "bad@x"), (7, "@x.com"),
                                                                 (9, "a b@example.com")]
    assert all(why for _, _, why in report.invalid)


def test_read_csv_without_email_column_is_an_error(tmp_path):
    path = tmp_path / write(tmp_path, "no-email.csv", "mail,name\nada@example.com,Ada\n")
    with pytest.raises(RecipientsError, match=r"no-email\.csv:1: .*'email' column"):
        list(read_csv(path, CsvReport()))


def test_read_csv_empty_and_header_only(tmp_path):
    with pytest.raises(RecipientsError, match="'email' column"):
        list(read_csv(tmp_path / write(tmp_path, "empty.csv", ""), CsvReport()))
    report = CsvReport()
    assert list(read_csv(tmp_path / write(tmp_path, "header.csv", "email,name\n"), report)) == []
    assert report.read == 0 and not report.invalid


# Regression (fixed in 48cdf6c): merge fields were stored under the raw header (' City ').
def test_read_csv_trims_merge_field_names_and_values(tmp_path):
    path = tmp_path / write(tmp_path, "ws.csv", "email , City ,Plan\nada@example.com, Paris ,pro\n")
    (recipient,) = read_csv(path, CsvReport())
    assert recipient.fields == {"City": "Paris", "Plan": "pro"}


def test_read_csv_status_column(tmp_path):
    text = ("email,name,status,changed_at,changed_how\n"
            "ada@example.com,Ada,subscribed,2024-01-01T00:00:00+00:00,import\n"
            "bob@example.com,Bob, Unsubscribed ,2024-01-02T00:00:00+00:00,cli remove\n"
            "cy@example.com,Cy,gone,2024-01-03T00:00:00+00:00,x\n"
            "dee@example.com,Dee,,,\n")
    report = CsvReport()
    got = list(read_csv(tmp_path / write(tmp_path, "export.csv", text), report))
    assert [(r.email, r.status) for r in got] == [
        ("ada@example.com", "subscribed"), ("bob@example.com", "unsubscribed"), ("dee@example.com", "subscribed")]
    assert all(r.fields == {} for r in got)  # export bookkeeping is not a merge field
    assert [(row, value) for row, value, _ in report.invalid] == [(4, "gone")]


# -- the store in-process ---------------------------------------------------------------------------

def test_store_add_honours_unsubscribes_and_suppressions(new_store):
    with new_store() as store:
        ada = Recipient("ada@example.com", "Ada", {"city": "London"})
        assert store.add(ada, "test") == "added"
        assert store.add(ada, "test") == "updated"
        assert store.add(Recipient("ADA@example.com"), "test") == "updated"  # one address, any case
        assert store.set_status("ada@example.com", "unsubscribed", "test remove") is True
        assert store.set_status("ada@example.com", "unsubscribed", "test remove") is False
        assert store.add(ada, "import") == "unsubscribed"
        assert store.add(ada, "cli add", resubscribe=True) == "resubscribed"
        store.suppress("Eve@Example.com", "hard bounce")
        assert store.suppressed("eve@example.com")
        assert store.add(Recipient("eve@example.com"), "import") == "suppressed"
        assert store.add(Recipient("eve@example.com"), "cli add", resubscribe=True) == "suppressed"
        listed = list(store.subscribers())
        assert store.count_subscribers() == {"subscribed": 1}
    assert len(listed) == 1
    email, name, fields, status, changed_at, how = listed[0]
    assert (email, name, status, how) == ("ada@example.com", "Ada", "subscribed", "cli add")
    assert json.loads(fields) == {"city": "London"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", changed_at)


@pytest.mark.sqlite_only
def test_store_is_a_real_sqlite_file(tmp_path):
    path = tmp_path / "store.sqlite3"
    with Store(path) as store:
        store.add(Recipient("ada@example.com", "Ada", {"plan": "pro"}), "test")
        store.add(Recipient("bob@example.com"), "test")
        store.set_status("bob@example.com", "unsubscribed", "test")
        store.suppress("eve@example.com", "complaint")
    assert path.read_bytes()[:16] == b"SQLite format 3\x00"
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        tables = {t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"subscribers", "suppressions", "deliveries"} <= tables
        assert db.execute("SELECT email, name, fields, status FROM subscribers ORDER BY email").fetchall() == [
            ("ada@example.com", "Ada", '{"plan": "pro"}', "subscribed"),
            ("bob@example.com", None, None, "unsubscribed")]
        assert db.execute("SELECT email, reason FROM suppressions").fetchall() == [("eve@example.com", "complaint")]
    finally:
        db.close()


def test_mark_many_sets_every_row_past_the_parameter_chunk(new_store):
    with new_store() as store:
        with store.transaction():
            for i in range(1203):
                store.add(Recipient(f"r{i}@example.com"), "test")
        assert store.enqueue_subscribers("issue", lambda email: "k" + email) == 1203
        ids = [d.id for d in store.due("issue", 2000)]
        store.mark_many(ids[:1201], "sending", count_attempt=True)
        store.mark_many(ids[1:1202], "sent", reply="250 ok")
        rows = store.db.execute("SELECT state, reply, attempts FROM deliveries ORDER BY id").fetchall()
    assert rows[0] == ("sending", None, 1)
    assert rows[1:1201] == [("sent", "250 ok", 1)] * 1200
    assert rows[1201] == ("sent", "250 ok", 0)
    assert rows[1202] == ("pending", None, 0)


def test_a_sends_marks_of_many_rows_and_states_are_written_as_given(new_store):
    """Store.write_marks, as a send's ledger writes it (on PostgreSQL, one statement for
    all the rows): each row its own state, reply, next try, fault and via; `sending`
    counts an attempt; a row marked twice in one write gets both marks; suppressions
    and bounced readers in the same transaction."""
    from newsletter.store import Mark
    with new_store() as store:
        for i in range(6):
            store.add(Recipient(f"r{i}@example.com"), "test")
        store.enqueue_subscribers("issue", lambda email: "k" + email)
        a, b, c, d, e, f = [row.id for row in store.due("issue", 10)]
        store.write_marks([Mark(a, "sending", via="smtp", attempt=1), Mark(b, "sending", via="smtp", attempt=1),
                           Mark(e, "sending", via="smtp", attempt=1)])
        store.write_marks([Mark(a, "sent", "250 2.0.0 Ok: queued as 4Xk2"),
                           Mark(b, "failed", "550 5.1.1 no such user", fault="recipient"),
                           Mark(c, "sending", via="smtp", attempt=1), Mark(c, "deferred", "421 later", 99.5, "server"),
                           Mark(e, "pending", "not sent: the server went away")],
                          suppress=[("r1@example.com", "550 5.1.1 no such user")])
        store.write_marks([Mark(f, "sending", via="resend", attempt=1)])
        store.write_marks([Mark(f, "sent", "200 id-1")])
        rows = store.db.execute("SELECT state, reply, next_try, fault, via, attempts FROM deliveries"
                                " ORDER BY id").fetchall()
        assert store.suppressed("r1@example.com") and store.status("r1@example.com") == "bounced"
        assert store.status("r0@example.com") == "subscribed"
    assert [tuple(r) for r in rows] == [
        ("sent", "250 2.0.0 Ok: queued as 4Xk2", 0, None, "smtp", 1),
        ("failed", "550 5.1.1 no such user", 0, "recipient", "smtp", 1),
        ("deferred", "421 later", 99.5, "server", "smtp", 1),
        ("pending", None, 0, None, None, 0),
        ("pending", "not sent: the server went away", 0, None, "smtp", 1),
        ("sent", "200 id-1", 0, None, "resend", 1)]


def test_a_row_marked_twice_in_one_write_ends_with_its_last_mark(new_store):
    """Marks for one row never land out of order: on SQLite, rows that shared a new state
    shared one UPDATE, so a row's `sending` ran after its own deferral when another row
    had been deferred alike earlier in the same write (PostgreSQL merges them in order)."""
    from newsletter.store import Mark
    deferral = ("451 later", 99.5, "server")
    with new_store() as store:
        for i in range(2):
            store.add(Recipient(f"r{i}@example.com"), "test")
        store.enqueue_subscribers("issue", lambda email: "k" + email)
        a, b = [row.id for row in store.due("issue", 10)]
        store.write_marks([Mark(a, "deferred", *deferral), Mark(b, "sending", via="smtp", attempt=1),
                           Mark(b, "deferred", *deferral)])
        rows = store.db.execute("SELECT state, reply, attempts FROM deliveries ORDER BY id").fetchall()
    assert [tuple(r) for r in rows] == [("deferred", "451 later", 0), ("deferred", "451 later", 1)]


def test_a_list_is_queued_in_its_own_order_once(new_store):
    """Store.enqueue (PostgreSQL: through COPY): rows in the list's order, each address
    once in any case, and a second queueing of a longer list adds only the new ones."""
    listed = [Recipient(f"r{i}@example.com", f"R {i}", {"n": str(i)} if i % 2 else {}) for i in (5, 3, 9, 1, 7)]
    signed = []

    def key_of(email):
        signed.append(email)
        return "k" + email

    with new_store() as store:
        assert store.enqueue("issue", listed, key_of) == 5
        assert store.enqueue("issue", [Recipient("R3@EXAMPLE.com"), *listed, Recipient("r0@example.com"),
                                       Recipient("gone@example.com", status="unsubscribed")], key_of, chunk=3) == 1
        assert store.enqueue("other", listed[:1], key_of) == 1  # another issue's ledger is its own
        rows = store.due("issue", 10)
    assert [(r.email, r.name, r.rkey) for r in rows] == [
        *[(x.email, x.name, "k" + x.email) for x in listed], ("r0@example.com", None, "kr0@example.com")]
    assert [r.fields for r in rows[:2]] == [{"n": "5"}, {"n": "3"}]
    # the second time, only the new reader was signed: those in the ledger were looked up first
    assert signed == [x.email for x in listed] + ["r0@example.com", "r5@example.com"]


def test_a_list_holding_an_address_twice_queues_it_once(new_store):
    """read_csv drops duplicates, but Store.enqueue takes any list: an address twice in one
    chunk, in another case the second time, gets one row, the first one's (PostgreSQL: the
    plain INSERT is refused, and the chunk goes in again with ON CONFLICT)."""
    listed = [Recipient("a@example.com", "First"), Recipient("b@example.com"), Recipient("A@Example.com", "Second")]
    with new_store() as store:
        assert store.enqueue("issue", listed, lambda e: "k" + e) == 2
        assert store.enqueue("issue", listed, lambda e: "k" + e) == 0
        rows = store.due("issue", 10)
    assert [(r.email, r.name) for r in rows] == [("a@example.com", "First"), ("b@example.com", None)]


def test_queueing_again_signs_only_the_new_subscribers(new_store):
    signed = []

    def key_of(email):
        signed.append(email)
        return "k" + email

    with new_store() as store:
        for address in ("a@example.com", "b@example.com"):
            store.add(Recipient(address), "test")
        assert store.enqueue_subscribers("issue", key_of) == 2
        store.add(Recipient("c@example.com"), "test")
        assert store.enqueue_subscribers("issue", key_of) == 1
        assert store.enqueue_subscribers("other", key_of) == 3
    assert sorted(signed) == sorted(["a@example.com", "b@example.com", "c@example.com"] * 2)


# -- the CLI ----------------------------------------------------------------------------------------

def test_import_keeps_fields_and_names_every_bad_row(project):
    name = write(project, "people.csv", PEOPLE, bom=True)
    result = run("subscribers", "import", name, cwd=project)
    assert result.returncode == 1  # some rows were invalid
    skipped = skipped_lines(result.stderr, name)
    assert [(row, value) for row, value, _ in skipped] == [(3, "bad@x"), (7, "@x.com"), (9, "a b@example.com")]
    assert "people.csv: 1 duplicate address counted once" in result.stderr.splitlines()
    assert result.stdout.strip() == "people.csv: 7 row(s): 3 added, 0 already subscribed, 3 invalid"
    stored = rows(project)
    assert sorted(stored) == ["Ada@example.com", "bob@example.com", "zoe@example.com"]
    ada = stored["Ada@example.com"]
    assert ada[0] == "Ada Lovelace" and json.loads(ada[1]) == {"city": "London", "plan": "pro"}
    assert ada[2] == "subscribed" and ada[4] == "import people.csv"
    assert stored["zoe@example.com"][0] == "Zoë, O'Brien"
    assert json.loads(stored["zoe@example.com"][1]) == {"city": "Dublin", "plan": ""}
    assert stored["bob@example.com"][0] is None


def test_import_of_a_clean_file_exits_0_and_reimport_changes_nothing(project):
    name = write(project, "clean.csv", "email,name,plan\nada@example.com,Ada,pro\nBob@Example.com,,free\n")
    first = run("subscribers", "import", name, cwd=project)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "clean.csv: 2 row(s): 2 added, 0 already subscribed, 0 invalid"
    assert first.stderr == ""
    before = rows(project)
    assert sorted(before) == ["Bob@example.com", "ada@example.com"]
    again = run("subscribers", "import", name, cwd=project)
    assert again.returncode == 0
    assert again.stdout.strip() == "clean.csv: 2 row(s): 0 added, 2 already subscribed, 0 invalid"
    assert rows(project) == before


def test_unsubscribed_stays_unsubscribed_on_import_but_add_resubscribes(project):
    name = write(project, "list.csv", "email,name\nada@example.com,Ada\nbob@example.com,Bob\n")
    assert run("subscribers", "import", name, cwd=project).returncode == 0
    removed = run("subscribers", "remove", "BOB@Example.COM", cwd=project)
    assert removed.returncode == 0 and "unsubscribed" in removed.stdout
    _, _, status, _, how = rows(project)["bob@example.com"]
    assert (status, how) == ("unsubscribed", "cli remove")
    again = run("subscribers", "import", name, cwd=project)
    assert again.returncode == 0
    assert again.stdout.strip() == "list.csv: 2 row(s): 0 added, 1 already subscribed, 1 left unsubscribed, 0 invalid"
    assert rows(project)["bob@example.com"][2] == "unsubscribed"
    added = run("subscribers", "add", "bob@example.com", "--name", "Robert", cwd=project)
    assert added.returncode == 0
    assert added.stdout.strip() == "bob@example.com: resubscribed"
    name_, _, status, _, how = rows(project)["bob@example.com"]
    assert (name_, status, how) == ("Robert", "subscribed", "cli add")


def test_suppressed_address_is_never_added(project):
    with open_at(store_env().get("NEWSLETTER_STORE_URL") or project / "newsletter.sqlite3") as store:
        store.suppress("Eve@Example.com", "hard bounce 5.1.1")
    name = write(project, "eve.csv", "email\neve@example.com\nada@example.com\n")
    result = run("subscribers", "import", name, cwd=project)
    assert result.returncode == 0
    assert result.stdout.strip() == ("eve.csv: 2 row(s): 1 added, 0 already subscribed, "
                                     "1 suppressed, not added, 0 invalid")
    assert sorted(rows(project)) == ["ada@example.com"]
    add = run("subscribers", "add", "EVE@example.com", cwd=project)
    assert add.returncode == 1
    assert add.stdout.strip() == "EVE@example.com: suppressed"
    assert sorted(rows(project)) == ["ada@example.com"]


def test_csv_without_email_column_is_a_clear_error(project):
    name = write(project, "names.csv", "mail,name\nada@example.com,Ada\n")
    result = run("subscribers", "import", name, cwd=project)
    assert result.returncode == 2
    assert result.stderr.strip() == ("newsletter: names.csv:1: the header row needs an 'email' column "
                                     "(found: mail, name)")
    assert rows(project) == {}


def test_empty_and_header_only_files(project):
    empty = run("subscribers", "import", write(project, "empty.csv", ""), cwd=project)
    assert empty.returncode == 2
    assert "empty.csv:1: the header row needs an 'email' column (found: nothing)" in empty.stderr
    header = run("subscribers", "import", write(project, "header.csv", "email,name\n"), cwd=project)
    assert header.returncode == 0
    assert header.stdout.strip() == "header.csv: 0 row(s): 0 added, 0 already subscribed, 0 invalid"
    assert rows(project) == {}


def test_export_list_and_remove(project):
    name = write(project, "list.csv", "email,name\nada@example.com,\"Lovelace, Ada\"\nbob@example.com,\n"
                                      "zoe@example.com,Zoë\n")
    assert run("subscribers", "import", name, cwd=project).returncode == 0
    assert run("subscribers", "remove", "bob@example.com", cwd=project).returncode == 0

    unknown = run("subscribers", "remove", "nobody@example.com", cwd=project)
    assert unknown.returncode == 1
    assert unknown.stdout.strip() == "nobody@example.com: not a current subscriber"
    assert run("subscribers", "remove", "bob@example.com", cwd=project).returncode == 1  # already out

    listed = run("subscribers", "list", "--status", "unsubscribed", cwd=project)
    assert listed.returncode == 0
    assert [line.split()[:2] for line in listed.stdout.splitlines()] == [["bob@example.com", "unsubscribed"]]
    assert listed.stderr.strip() == "1 subscriber(s)"
    everyone = run("subscribers", "list", cwd=project)
    assert [line.split()[0] for line in everyone.stdout.splitlines()] == [
        "ada@example.com", "bob@example.com", "zoe@example.com"]
    assert everyone.stderr.strip() == "3 subscriber(s)"

    exported = run("subscribers", "export", "--out", "export.csv", cwd=project)
    assert exported.returncode == 0
    text = (project / "export.csv").read_text(encoding="utf-8")
    assert run("subscribers", "export", cwd=project).stdout.replace("\r\n", "\n") == text.replace("\r\n", "\n")
    table = list(csv.reader(io.StringIO(text)))
    assert table[0] == EXPORT_HEADER
    stored = rows(project)
    assert table[1:] == [[e, n or "", s, at, how] for e, (n, _f, s, at, how) in stored.items()]
    assert [(r[0], r[1], r[2]) for r in table[1:]] == [
        ("ada@example.com", "Lovelace, Ada", "subscribed"), ("bob@example.com", "", "unsubscribed"),
        ("zoe@example.com", "Zoë", "subscribed")]

    # The export imports cleanly back into the same store, and changes nothing there.
    back = run("subscribers", "import", "export.csv", cwd=project)
    assert back.returncode == 0
    assert "0 added, 2 already subscribed, 1 left unsubscribed, 0 invalid" in back.stdout
    assert rows(project) == stored


# Regression (fixed in 48cdf6c): an export imported into a new store re-subscribed everyone
# (status ignored) and kept status/changed_at/changed_how as merge fields.
@pytest.mark.sqlite_only  # two stores: two files (the PostgreSQL copy: test_store_pg.py)
def test_export_round_trips_through_import_into_a_new_store(project, tmp_path_factory):
    name = write(project, "list.csv", 'email,name\nada@example.com,Ada\nbob@example.com,Bob\n'
                                      'zoe@example.com,"Zoë, O\'Brien"\n')
    assert run("subscribers", "import", name, cwd=project).returncode == 0
    assert run("subscribers", "remove", "bob@example.com", cwd=project).returncode == 0
    assert run("subscribers", "export", "--out", "export.csv", cwd=project).returncode == 0

    other = tmp_path_factory.mktemp("other")
    shutil.copy(ROOT / "newsletter.toml", other)
    shutil.copy(project / "export.csv", other)
    imported = run("subscribers", "import", "export.csv", cwd=other)
    assert imported.returncode == 0, imported.stderr
    assert {e: (r[0], r[2]) for e, r in rows(other).items()} == {
        e: (r[0], r[2]) for e, r in rows(project).items()} == {
        "ada@example.com": ("Ada", "subscribed"), "bob@example.com": ("Bob", "unsubscribed"),
        "zoe@example.com": ("Zoë, O'Brien", "subscribed")}
    assert all(r[1] is None for r in rows(other).values())  # no bookkeeping columns as merge fields
    again = run("subscribers", "export", cwd=other).stdout
    first = (project / "export.csv").read_text(encoding="utf-8")
    columns = lambda text: [row[:3] for row in csv.reader(io.StringIO(text))]  # noqa: E731
    assert columns(again) == columns(first)


def test_add_validates_and_cleans(project):
    bad = run("subscribers", "add", "a@b", cwd=project)
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("newsletter: 'a@b': ")
    # A name that could break a header is refused, never mended into something else.
    evil = run("subscribers", "add", "ada@example.com", "--name", "Ada\r\nBcc: evil@example.com", cwd=project)
    assert evil.returncode == 1 and "--name: expected one line" in evil.stderr
    ok = run("subscribers", "add", " Ada@Example.COM ", "--name", "  Ada   Lovelace ", cwd=project)
    assert ok.returncode == 0
    assert ok.stdout.strip() == "Ada@example.com: added"
    assert rows(project)["Ada@example.com"][0] == "Ada Lovelace"  # white space tidied


def test_a_reply_with_a_lone_surrogate_is_kept_readable(new_store):
    """A provider's JSON may decode to a lone surrogate, which no database can encode."""
    with new_store() as store:
        store.add(Recipient("a@example.com"), "test")
        store.enqueue_subscribers("issue", lambda email: "k" + email)
        (row,) = store.due("issue", 10)
        store.mark_many([row.id], "failed", "550 \udc80 refused", fault="recipient")
        store.suppress("a@example.com", "hard bounce \ud800")
        assert store.problems("issue")[0][2] == "550 ? refused"
        assert list(store.suppressions())[0][1] == "hard bounce ?"
