"""The store: subscribers, suppressions and the send ledger, in one SQLite file (the
embedded default) or in PostgreSQL (store_pg.py, for a store shared between machines).

    subscribers   one row per address: name, merge fields, status and when/how it changed
    suppressions  addresses never to send to (hard bounces, complaints, manual blocks)
    deliveries    the ledger: one row per (issue, destination, address) and its state
    sends         one row per (issue, destination): what the send began with
    events        what came back (unsubscribes, bounces, complaints), by source and id,
                  so that an event delivered twice changes nothing twice

Destinations: `outbox` for proofs, `mail` for every real backend; a proof never counts as
a delivery (outcome.destination). Ledger states (outcome.py says what puts a row in each):
pending -> sending -> sent | deferred | failed | uncertain ; pending -> skipped.
A row becomes `sending` (committed) just before its message goes out, and `sent` only
after the server's 250 to DATA. WAL mode with synchronous=NORMAL: a commit survives the
process being killed, which is the failure this ledger is built for. The schema's
version is SQLite's user_version; older stores are upgraded when opened (a shared
PostgreSQL store waits for `newsletter store migrate`), and a store newer than this tool
is refused.

`Store` holds the behaviour both databases share, in SQL both run (`?` placeholders,
ON CONFLICT), and opens SQLite; `PostgresStore` changes how it connects, locks and
claims work. `open_store(settings)` picks one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from .errors import StoreError
from .outcome import DELIVERY, PROOF, RECIPIENT, STATES, Event, event_effect
from .recipients import Recipient

STATUSES = ("subscribed", "unsubscribed", "bounced", "complained")
SCHEMA_VERSION = 3  # 3: deliveries.claimed_by, the sender that claimed a row

SCHEMA = """
CREATE TABLE IF NOT EXISTS subscribers (
    id          INTEGER PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE COLLATE NOCASE,
    name        TEXT,
    fields      TEXT,
    status      TEXT NOT NULL DEFAULT 'subscribed'
                CHECK (status IN ('subscribed', 'unsubscribed', 'bounced', 'complained')),
    changed_at  TEXT NOT NULL,
    changed_how TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS suppressions (
    email       TEXT PRIMARY KEY COLLATE NOCASE,
    reason      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id          INTEGER PRIMARY KEY,
    issue       TEXT NOT NULL,
    destination TEXT NOT NULL DEFAULT 'mail' CHECK (destination IN ('mail', 'outbox')),
    email       TEXT NOT NULL COLLATE NOCASE,
    name        TEXT,
    fields      TEXT,
    rkey        TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'sending', 'sent', 'deferred', 'failed', 'skipped', 'uncertain')),
    fault       TEXT,               -- who was at fault for anything but sent (outcome.FAULTS)
    via         TEXT,               -- the backend that last tried it
    attempts    INTEGER NOT NULL DEFAULT 0,
    reply       TEXT,
    next_try    REAL NOT NULL DEFAULT 0,
    updated_at  TEXT NOT NULL,
    claimed_by  INTEGER,            -- the send run that claimed it (PostgreSQL: several senders)
    UNIQUE (issue, destination, email)
);
-- Sends read an issue's rows in id order: (issue, destination, id) finds the next batch at
-- once, and no send writes to it. No index on state: every row is written twice per send,
-- and such an index would double the pages each write touches.
CREATE INDEX IF NOT EXISTS deliveries_by_send ON deliveries (issue, destination, id);
CREATE INDEX IF NOT EXISTS deliveries_by_rkey ON deliveries (rkey);
CREATE TABLE IF NOT EXISTS sends (
    issue       TEXT NOT NULL,
    destination TEXT NOT NULL DEFAULT 'mail',
    digest      TEXT NOT NULL,      -- of the rendered email: what this send is sending
    source      TEXT,               -- the issue file it was read from
    started_at  TEXT NOT NULL,
    PRIMARY KEY (issue, destination)
);
CREATE TABLE IF NOT EXISTS events (
    source      TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    email       TEXT NOT NULL COLLATE NOCASE,
    received_at TEXT NOT NULL,
    PRIMARY KEY (source, event_id)
);
"""


_now_cache: tuple[int, str] = (0, "")


def now_iso() -> str:
    """UTC now, to the second: written twice a message, so made once a second."""
    global _now_cache
    second = int(time.time())
    if _now_cache[0] != second:
        _now_cache = (second, dt.datetime.fromtimestamp(second, dt.timezone.utc).isoformat())
    return _now_cache[1]


def storable(text: str | None) -> str | None:
    """A server's or provider's words as a database can keep them: a lone surrogate (a
    provider's JSON may hold one) cannot be encoded, and is replaced."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "replace").decode("utf-8")


class Delivery(NamedTuple):  # a tuple: made for every row of a send, and cheaper than a dataclass
    id: int
    email: str
    name: str | None
    fields: dict
    rkey: str
    attempts: int


def _why(path: Path, exc: BaseException) -> str:
    """SQLite's words, and what they mean for the user (its 'unable to open database file'
    says neither which file nor why)."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and ("readonly" in text or "unable to open" in text) and \
            not (os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))):
        return f"{text}: the store or its folder is read-only; it must be writable (with its -wal and -shm files)"
    if "full" in text:
        return f"{text}: the disk is full; free some space and run the command again"
    if "disk I/O error" in text:
        name = getattr(exc, "sqlite_errorname", "")
        return f"{text} ({name}): the disk may be full, or the file over a size limit (ulimit -f)"
    return text


class _Connection(sqlite3.Connection):
    """Every SQLite failure as a StoreError naming the file: a read-only folder or a full
    disk mid-send is the user's to fix, said plainly, never a traceback."""

    store_path: Path

    def execute(self, *args):
        try:
            return super().execute(*args)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.store_path}: {_why(self.store_path, exc)}") from exc

    def executemany(self, *args):
        try:
            return super().executemany(*args)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.store_path}: {_why(self.store_path, exc)}") from exc


# A row due to be sent, after a given id: its parameters are the issue, the destination,
# the id and the time now (pending, or deferred and its retry due).
DUE = ("issue = ? AND destination = ? AND id > ?"
       " AND (state = 'pending' OR (state = 'deferred' AND next_try <= ?))")


SET_STATUS = "UPDATE subscribers SET status = ?, changed_at = ?, changed_how = ? WHERE email = ? AND status != ?"
SUPPRESS = "INSERT INTO suppressions (email, reason, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"


class Mark(NamedTuple):
    """A row's new state, as a send writes it: a message's outcome, or `sending` just
    before it goes out (with `attempt` 1: one more try counted)."""
    id: int
    state: str
    reply: str | None = None
    next_try: float = 0
    fault: str | None = None
    via: str | None = None
    attempt: int = 0


def deliveries(rows) -> list[Delivery]:
    """Delivery tuples from (id, email, name, fields, rkey, attempts) rows."""
    return [Delivery(i, e, n, json.loads(f) if f else {}, k, a) for i, e, n, f, k, a in rows]


class Store:
    kind = "SQLite"
    shared = False  # whether several sends of an issue may run at once
    _begin = "BEGIN IMMEDIATE"  # takes the write lock at once: no deadlock between two writers
    _contains = "instr({}, {}) > 0"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.where = str(self.path)  # for messages
        self.upgraded_from: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30, factory=_Connection)
            self.db.store_path = self.path
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._upgrade()
        except StoreError as exc:
            raise StoreError(f"{self.path}: cannot open the store: {str(exc).removeprefix(f'{self.path}: ')}") \
                from exc.__cause__
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{self.path}: cannot open the store: {_why(self.path, exc)}") from exc

    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def _too_new(self, version: int) -> StoreError:
        return StoreError(f"{self.where}: made by a newer newsletter (schema {version}; this one knows "
                          f"{SCHEMA_VERSION}): upgrade newsletter to use it")

    def migrate(self) -> tuple[int | None, int]:
        """`newsletter store migrate`: (the version it had, the version it has now); an
        embedded store is upgraded as it is opened, so this reports what opening did."""
        return self.upgraded_from, self.schema_version()

    def _upgrade(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise self._too_new(version)
        if version == SCHEMA_VERSION:
            return
        with self.transaction():
            # Again, now that no one else can write: another process (serve and send, opened
            # together) may have upgraded it meanwhile, and the version-0 migration must not
            # run over an upgraded ledger.
            version = self.schema_version()
            if version == SCHEMA_VERSION:
                return
            self.upgraded_from = version
            old = version == 0 and self.db.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'deliveries'").fetchone()
            if old:
                # Version 0 kept one ledger for proofs and deliveries alike: tell them apart
                # by the outbox's reply, and rebuild the tables with their new keys.
                for table in ("deliveries", "sends"):
                    self.db.execute(f"ALTER TABLE {table} RENAME TO {table}_v0")
                self.db.execute("DROP INDEX IF EXISTS deliveries_by_issue")
                self.db.execute("DROP INDEX IF EXISTS deliveries_by_rkey")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)  # not executescript: it would commit half-way
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(deliveries)")}
            if "claimed_by" not in columns:  # versions 1 and 2
                self.db.execute("ALTER TABLE deliveries ADD COLUMN claimed_by INTEGER")
            if old:
                self.db.execute(
                    "INSERT INTO deliveries (id, issue, destination, email, name, fields, rkey, state, attempts,"
                    " reply, next_try, updated_at) SELECT id, issue, CASE WHEN reply LIKE 'written to %'"
                    " THEN 'outbox' ELSE 'mail' END, email, name, fields, rkey, state, attempts, reply, next_try,"
                    " updated_at FROM deliveries_v0")
                self.db.execute("INSERT INTO sends (issue, destination, digest, started_at)"
                                " SELECT issue, 'mail', digest, started_at FROM sends_v0")
                self.db.execute("DROP TABLE deliveries_v0")
                self.db.execute("DROP TABLE sends_v0")
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def check_writable(self) -> None:
        """StoreError now if this store cannot be written (read-only file, folder or mount),
        rather than at a reader's first click. Writes the header's version as it is, and
        rolls back: nothing changes."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            self.db.execute(f"PRAGMA user_version = {int(version)}")
        finally:
            self.db.execute("ROLLBACK")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def transaction(self, needed: bool = True):
        """BEGIN IMMEDIATE ... COMMIT; `needed=False` for a single statement, which
        commits on its own (half the cost per message on the SMTP path). Inside another
        transaction it joins that one (serve commits a round of unsubscribes at once)."""
        return _Transaction(self.db, self._begin) if needed and not self.db.in_transaction \
            else contextlib.nullcontext(self.db)

    def _pages(self, sql: str, args: tuple, page: int = 5000) -> Iterator[tuple]:
        """Rows of `sql` (whose first column is the unique email it is ordered by; `args`
        fill its placeholders before {after} and LIMIT), a page
        at a time by key: a million rows are never held at once, and the connection stays
        free for other queries between pages (a send checks each page against the store)."""
        last = ""
        while True:
            rows = self.db.execute(sql.format(after="email > ?"), (*args, last, page)).fetchall()
            yield from rows
            if len(rows) < page:
                return
            last = rows[-1][0]

    # -- subscribers -------------------------------------------------------------------------

    def add(self, recipient: Recipient, how: str, resubscribe: bool = False) -> str:
        """'added', 'updated' (name or fields), 'resubscribed', or the status that kept
        them out. A recipient whose own status is not 'subscribed' (from an export) is
        stored with it; an unsubscribe is never undone except by an explicit add."""
        if self.suppressed(recipient.email):
            return "suppressed"
        row = self.db.execute("SELECT status FROM subscribers WHERE email = ?", (recipient.email,)).fetchone()
        fields = json.dumps(recipient.fields, sort_keys=True) if recipient.fields else None
        if row is None:
            cur = self.db.execute(
                "INSERT INTO subscribers (email, name, fields, status, changed_at, changed_how)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (recipient.email, recipient.name, fields, recipient.status, recipient.changed_at or now_iso(),
                 recipient.changed_how or how))  # an export's own history is kept
            if cur.rowcount:
                return "added" if recipient.status == "subscribed" else recipient.status
            # another process (a shared store's other service) added them meanwhile
            row = self.db.execute("SELECT status FROM subscribers WHERE email = ?", (recipient.email,)).fetchone()
        if recipient.status != "subscribed":
            self.set_status(recipient.email, recipient.status, how)
            return recipient.status
        if row[0] != "subscribed" and not resubscribe:
            return row[0]  # an unsubscribe is honoured; only an explicit add brings them back
        self.db.execute(
            "UPDATE subscribers SET name = coalesce(?, name), fields = coalesce(?, fields),"
            " status = 'subscribed', changed_at = CASE WHEN status = 'subscribed' THEN changed_at ELSE ? END,"
            " changed_how = CASE WHEN status = 'subscribed' THEN changed_how ELSE ? END WHERE email = ?",
            (recipient.name, fields, now_iso(), how, recipient.email))
        return "updated" if row[0] == "subscribed" else "resubscribed"

    def set_status(self, email: str, status: str, how: str) -> bool:
        assert status in STATUSES
        cur = self.db.execute(SET_STATUS, (status, now_iso(), how, email, status))
        return cur.rowcount > 0

    def suppress(self, email: str, reason: str, at: str | None = None) -> None:
        reason = storable(reason)
        self.db.execute(SUPPRESS, (email, reason, at or now_iso()))

    def suppressions(self) -> Iterator[tuple[str, str, str]]:
        """(email, reason, created_at), in address order."""
        yield from self._pages("SELECT email, reason, created_at FROM suppressions WHERE {after}"
                               " ORDER BY email LIMIT ?", ())

    def suppressed(self, email: str) -> bool:
        return self.db.execute("SELECT 1 FROM suppressions WHERE email = ?", (email,)).fetchone() is not None

    def status(self, email: str) -> str | None:
        """The subscriber's status, or None for an address with no subscriber row."""
        row = self.db.execute("SELECT status FROM subscribers WHERE email = ?", (email,)).fetchone()
        return row[0] if row else None

    def has_event(self, source: str, event_id: str) -> bool:
        """Whether record_event has applied this event already."""
        return self.db.execute("SELECT 1 FROM events WHERE source = ? AND event_id = ?",
                               (source, event_id)).fetchone() is not None

    def subscribers(self, status: str | None = None) -> Iterator[tuple]:
        """(email, name, fields, status, changed_at, changed_how), streamed in address order."""
        which = "status = ? AND " if status else ""
        yield from self._pages("SELECT email, name, fields, status, changed_at, changed_how FROM subscribers"
                               f" WHERE {which}{{after}} ORDER BY email LIMIT ?", (status,) if status else ())

    def count_subscribers(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, count(*) FROM subscribers GROUP BY status"))

    def restore(self, emails: Iterable[str] = (), reply: str | None = None, since: str | None = None,
                until: str | None = None, apply: bool = True) -> list[tuple[str, str, str]]:
        """Lift suppressions that a refusal which was not the reader's put in place: by
        address, by words of the reply, by time (ISO, UTC). Bounced subscribers among them
        are subscribed again (never the unsubscribed or complained), and their failed rows
        in the ledger go back to pending. Returns (email, reason, when) for each."""
        where, args = [], []
        emails = list(emails)
        if emails:
            where.append(f"email IN ({','.join('?' * len(emails))})")
            args += emails
        if reply:
            where.append(self._contains.format("lower(reason)", "lower(?)"))
            args.append(reply)
        if since:
            where.append("created_at >= ?")
            args.append(since)
        if until:
            where.append("created_at <= ?")
            args.append(until)
        if not where:
            raise StoreError("restore: name addresses, --reply or --since/--until; it never lifts every suppression")
        found = self.db.execute(f"SELECT email, reason, created_at FROM suppressions WHERE {' AND '.join(where)}"
                                " ORDER BY created_at, email", args).fetchall()
        if not apply:
            return found
        with self.transaction():
            for email, _reason, _when in found:
                self.db.execute("DELETE FROM suppressions WHERE email = ?", (email,))
                self.db.execute("UPDATE subscribers SET status = 'subscribed', changed_at = ?, changed_how = ?"
                                " WHERE email = ? AND status = 'bounced'", (now_iso(), "restore", email))
                self.db.execute("UPDATE deliveries SET state = 'pending', fault = NULL, attempts = 0,"
                                " claimed_by = NULL,"
                                " reply = 'restored: ' || coalesce(reply, ''), updated_at = ?"
                                " WHERE email = ? AND state = 'failed' AND fault = ?", (now_iso(), email, RECIPIENT))
        return found

    def record_event(self, event: Event) -> bool:
        """Apply what came back through outcome.event_effect; False when this event (by its
        source and id) was applied before, or names nobody we know."""
        with self.transaction():
            return self._apply_event(event)

    def record_events(self, events: Iterable[Event]) -> int:
        """record_event for a provider's batch in one transaction (one commit for a
        thousand events); how many changed anything."""
        with self.transaction():
            return sum(self._apply_event(event) for event in events)

    def _apply_event(self, event: Event) -> bool:
        effect = event_effect(event)
        if event.event_id is not None:
            cur = self.db.execute(
                "INSERT INTO events (source, event_id, kind, email, received_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (event.source, event.event_id, event.kind, event.email, now_iso()))
            if not cur.rowcount:
                return False  # a replay
        how = f"{event.source}: {event.reason}".rstrip(": ")
        changed = bool(effect.status and self.set_status(event.email, effect.status, how))
        if effect.suppress:
            self.suppress(event.email, f"{event.kind} ({how})")
            changed = True
        if effect.ledger_state and event.issue:
            self.db.execute(
                "UPDATE deliveries SET state = ?, fault = 'recipient', reply = ?, updated_at = ?"
                " WHERE issue = ? AND destination = 'mail' AND email = ?",
                (effect.ledger_state, f"{event.kind}: {how}", now_iso(), event.issue, event.email))
        return changed

    def email_for_key(self, rkey: str) -> str | None:
        """The address a recipient key (from an unsubscribe token) stands for."""
        row = self.db.execute("SELECT email FROM deliveries WHERE rkey = ? LIMIT 1", (rkey,)).fetchone()
        return row[0] if row else None

    # -- the ledger ----------------------------------------------------------------------------
    # Every method takes the issue and the destination (outcome.PROOF or DELIVERY).

    def enqueue_subscribers(self, issue: str, key_of, dest: str = DELIVERY) -> int:
        """Add every current subscriber who has no row for this issue yet, as pending."""
        self.db.create_function("rkey", 1, key_of, deterministic=True)
        with self.transaction():
            cur = self.db.execute(
                "INSERT OR IGNORE INTO deliveries (issue, destination, email, name, fields, rkey, updated_at)"
                " SELECT ?1, ?3, s.email, s.name, s.fields, rkey(s.email), ?2 FROM subscribers s"
                " WHERE s.status = 'subscribed'"
                " AND NOT EXISTS (SELECT 1 FROM suppressions x WHERE x.email = s.email)"
                # before rkey(): a resumed send of a million would otherwise sign them all again
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.issue = ?1 AND d.destination = ?3"
                " AND d.email = s.email)",
                (issue, now_iso(), dest))
        return cur.rowcount

    def enqueue(self, issue: str, recipients: Iterable[Recipient], key_of, chunk: int = 5000,
                dest: str = DELIVERY) -> int:
        """Add a list's readers who have no row for this issue yet, as pending, in its
        order; a transaction for each `chunk` of them. Returns how many were added. Readers
        already in the ledger are looked up first: a resumed send of a million from its
        list would otherwise sign them all again and write them all again for nothing."""
        added = 0
        listed: list[Recipient] = []
        stamp = now_iso()

        def add():
            present = self._in_ledger(issue, dest, [r.email for r in listed])
            rows = [(issue, dest, r.email, r.name, json.dumps(r.fields, sort_keys=True) if r.fields else None,
                     key_of(r.email), stamp) for r in listed if r.email not in present]
            return self._add_deliveries(rows) if rows else 0

        for r in recipients:
            if r.status != "subscribed":
                continue  # a list that says they left is honoured
            listed.append(r)
            if len(listed) >= chunk:
                added += add()
                listed = []
        if listed:
            added += add()
        return added

    def _in_ledger(self, issue: str, dest: str, emails: list[str]) -> set[str]:
        """Which of these addresses, as given, already have a row for this issue (compared
        as the ledger compares them: without regard to case)."""
        found: set[str] = set()
        for start in range(0, len(emails), 5000):
            found.update(e for (e,) in self.db.execute(
                "SELECT value FROM json_each(?) WHERE EXISTS (SELECT 1 FROM deliveries WHERE issue = ?"
                " AND destination = ? AND email = value)", (json.dumps(emails[start:start + 5000]), issue, dest)))
        return found

    def _add_deliveries(self, rows: list[tuple]) -> int:
        """(issue, destination, email, name, fields, rkey, updated_at) rows, in one
        transaction; a row already there stays as it is."""
        with self.transaction():
            return self.db.executemany(
                "INSERT INTO deliveries (issue, destination, email, name, fields, rkey, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", rows).rowcount

    def due(self, issue: str, batch_size: int, after_id: int = 0, now: float | None = None,
            dest: str = DELIVERY) -> list[Delivery]:
        """The next batch of rows to send (pending, or deferred and due), by id."""
        now = time.time() if now is None else now
        rows = self.db.execute(
            f"SELECT id, email, name, fields, rkey, attempts FROM deliveries WHERE {DUE} ORDER BY id LIMIT ?", (issue, dest, after_id, now, batch_size)).fetchall()
        return deliveries(rows)

    def blocked(self, emails: list[str]) -> set[str]:
        """Which of these addresses must not be sent to now (checked again right before sending)."""
        found: set[str] = set()
        for start in range(0, len(emails), 500):  # within SQLite's limit on parameters
            chunk = emails[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT email FROM suppressions WHERE email IN ({marks}) UNION "
                f"SELECT email FROM subscribers WHERE email IN ({marks}) AND status != 'subscribed'", chunk + chunk)
            found.update(e.lower() for (e,) in rows)
        return found

    def next_retry(self, issue: str, dest: str = DELIVERY) -> float | None:
        row = self.db.execute("SELECT min(next_try) FROM deliveries WHERE issue = ? AND destination = ?"
                              " AND state = 'deferred'", (issue, dest)).fetchone()
        return row[0]

    def mark(self, delivery_id: int, state: str, reply: str | None = None, next_try: float = 0,
             count_attempt: bool = False, fault: str | None = None, via: str | None = None) -> None:
        self.mark_many([delivery_id], state, reply, next_try, count_attempt, fault, via)

    def mark_many(self, ids: list[int], state: str, reply: str | None = None, next_try: float = 0,
                  count_attempt: bool = False, fault: str | None = None, via: str | None = None) -> None:
        """Give these rows one state: a statement per 500 rows, not one per row, which
        was the biggest part of an API send's cost per message."""
        stamp, counted, reply = now_iso(), 1 if count_attempt else 0, storable(reply)
        for start in range(0, len(ids), 500):  # within SQLite's limit on parameters
            chunk = ids[start:start + 500]
            self.db.execute(
                "UPDATE deliveries SET state = ?, reply = coalesce(?, reply), next_try = ?, updated_at = ?,"
                " fault = ?, via = coalesce(?, via),"
                f" attempts = attempts + ? WHERE id IN ({','.join('?' * len(chunk))})",
                (state, reply, next_try, stamp, fault, via, counted, *chunk))

    def write_marks(self, marks: list[Mark], suppress: Iterable[tuple[str, str]] = ()) -> None:
        """A send's marks in one transaction: rows that share a new state share one
        UPDATE; and the addresses whose own refusal suppresses them, (email, reply)."""
        runs: list[dict[tuple, list[int]]] = [{}]  # a row marked again starts a new run: its marks stay in order
        marked: set[int] = set()
        for mark in marks:
            if mark.id in marked:
                runs.append({})
                marked.clear()
            marked.add(mark.id)
            runs[-1].setdefault(mark[1:], []).append(mark.id)
        groups = [group for run in runs for group in run.items()]
        suppress = list(suppress)
        with self.transaction(len(groups) > 1 or len(marks) > 500 or bool(suppress)):  # 500: see mark_many
            for (state, reply, next_try, fault, via, attempt), ids in groups:
                self.mark_many(ids, state, reply, next_try, attempt, fault, via)
            for email, reply in suppress:
                self.suppress(email, reply)
                self.set_status(email, "bounced", f"send {reply}")

    def snapshot(self):
        """A transaction whose reads all see the store as it was at its start."""
        return self.transaction()  # SQLite: BEGIN IMMEDIATE, and nobody writes meanwhile

    def read_table(self, table: str, columns: tuple[str, ...], chunk: int) -> Iterator[list[tuple]]:
        """Every row of a table, in lists of `chunk` (store copy)."""
        cur = self.db.execute(f"SELECT {', '.join(columns)} FROM {table}")
        while rows := cur.fetchmany(chunk):
            yield rows

    def after_copy(self) -> None:
        """What a store needs after rows were copied in with their ids."""

    def in_flight(self, issue: str, dest: str = DELIVERY) -> list[tuple[str, str | None]]:
        return self.db.execute("SELECT email, updated_at FROM deliveries WHERE issue = ? AND destination = ?"
                               " AND state = 'sending' ORDER BY id", (issue, dest)).fetchall()

    # -- one send run: its lock, and the rows it claims ------------------------------------------
    # SQLite: one sender per issue (a lock file), so the rows due are its own. PostgreSQL
    # (store_pg.py): any number of senders, each claiming batches of rows for itself.

    def sender_lock(self, issue: str, dest: str = DELIVERY):
        """Held for the whole run: here, the only send of this issue."""
        return _LockFile(self.path.with_name(f"{self.path.name}.{issue}.{dest}.lock"), issue)

    def startup_lock(self, issue: str, dest: str = DELIVERY):
        """Held while a run settles what the last one left and fills the ledger."""
        return contextlib.nullcontext()

    def claim(self, issue: str, batch_size: int, after_id: int = 0, now: float | None = None,
              dest: str = DELIVERY) -> list[Delivery]:
        """The next rows this run is to send; no other run will take them."""
        return self.due(issue, batch_size, after_id, now, dest)

    def settle_in_flight(self, issue: str, dest: str = DELIVERY) -> list[str]:
        """Rows left `sending` by a send that was killed: their message may have gone out.
        A proof is written again; a delivery becomes uncertain, never resent by itself.
        Returns their addresses."""
        with self.transaction():
            found = [email for email, _ in self.in_flight(issue, dest)]
            self._settle(issue, dest, "")
        return found

    async def send_ledger(self) -> "SendLedger":
        """What a send's event loop uses while it sends: see SendLedger."""
        return SendLedger(self)

    def healthy(self) -> bool:
        """False when the connection is gone for good (a database server restarted): the
        web service then opens the store again."""
        return True

    def claimed_elsewhere(self, issue: str, dest: str = DELIVERY) -> int:
        """Rows not done that another running send has claimed: none here."""
        return 0

    def settle_peers(self, issue: str, dest: str = DELIVERY) -> tuple[list[str], int]:
        """settle_in_flight for the runs that died while this one ran (none here, where a
        run is alone): the addresses settled, and how many rows it gave this run to do."""
        return [], 0

    def _settle(self, issue: str, dest: str, which: str, *args):
        if dest == PROOF:
            state, reply = "pending", "interrupted while writing; written again"
        else:
            state, reply = "uncertain", "in flight when a send stopped: it may have been delivered"
        return self.db.execute(
            "UPDATE deliveries SET state = ?, reply = ?, fault = 'server', updated_at = ?"
            f" WHERE issue = ? AND destination = ? AND state = 'sending'{which}",
            (state, reply, now_iso(), issue, dest, *args))

    def requeue(self, issue: str, dest: str, state: str, reply_prefix: str) -> int:
        """Put rows back to pending: `uncertain` ones (--resend-uncertain), or `failed` ones
        whose failure was not the recipient's own (--retry-failed)."""
        assert state in ("uncertain", "failed")
        theirs = " AND (fault IS NULL OR fault != 'recipient')" if state == "failed" else ""
        cur = self.db.execute(
            "UPDATE deliveries SET state = 'pending', attempts = 0, claimed_by = NULL,"
            " reply = ? || coalesce(reply, ''),"
            f" updated_at = ? WHERE issue = ? AND destination = ? AND state = ?{theirs}",
            (reply_prefix, now_iso(), issue, dest, state))
        return cur.rowcount

    def send_digest(self, issue: str, digest: str, source: str, replace: bool = False,
                    dest: str = DELIVERY) -> tuple[str, str | None]:
        """The digest and source file this send began with (recorded now if it is the first run)."""
        self.db.execute("INSERT INTO sends (issue, destination, digest, source, started_at)"
                        " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", (issue, dest, digest, source, now_iso()))
        if replace:
            self.db.execute("UPDATE sends SET digest = ?, source = ? WHERE issue = ? AND destination = ?",
                            (digest, source, issue, dest))
        return self.db.execute("SELECT digest, source FROM sends WHERE issue = ? AND destination = ?",
                               (issue, dest)).fetchone()

    def counts(self, issue: str, dest: str = DELIVERY) -> dict[str, int]:
        found = dict(self.db.execute("SELECT state, count(*) FROM deliveries WHERE issue = ? AND destination = ?"
                                     " GROUP BY state", (issue, dest)))
        return {state: found.get(state, 0) for state in STATES}

    def destinations(self, issue: str) -> dict[str, dict[str, int]]:
        """Each destination's counts for this issue, and for deliveries, each backend's sent."""
        found: dict[str, dict[str, int]] = {}
        for dest, in self.db.execute("SELECT DISTINCT destination FROM deliveries WHERE issue = ?", (issue,)):
            found[dest] = self.counts(issue, dest)
        return found

    def sent_via(self, issue: str, dest: str = DELIVERY) -> dict[str, int]:
        return dict(self.db.execute("SELECT coalesce(via, ?), count(*) FROM deliveries WHERE issue = ?"
                                    " AND destination = ? AND state = 'sent' GROUP BY via", ("?", issue, dest)))

    def problems(self, issue: str, limit: int = 50, dest: str = DELIVERY) -> list[tuple[str, str, str, int, str]]:
        return self.db.execute(
            "SELECT email, state, coalesce(reply, ''), attempts, coalesce(fault, '') FROM deliveries"
            " WHERE issue = ? AND destination = ? AND state IN ('failed', 'deferred', 'uncertain')"
            " ORDER BY state, email LIMIT ?", (issue, dest, limit)).fetchall()


class SendLedger:
    """The store as a send's event loop uses it while messages go out: claim rows, check
    addresses, write marks. SQLite answers in microseconds, in the loop. A database
    server takes a round trip, during which the loop must go on: PostgresStore has its
    own (store_pg.ServerLedger), whose writes commit later."""

    def __init__(self, store: Store):
        self.store = store

    async def claim(self, issue: str, size: int, after_id: int, dest: str) -> list[Delivery]:
        return self.store.claim(issue, size, after_id=after_id, dest=dest)

    async def blocked(self, emails: list[str]) -> set[str]:
        return self.store.blocked(emails)

    def write(self, marks: list[Mark], suppress: Iterable[tuple[str, str]] = ()) -> "asyncio.Future | None":
        """Store.write_marks; None when it is committed already, else a future that is
        done when it is (or holds the StoreError that stopped it). Marks commit in the
        order they were written."""
        self.store.write_marks(marks, suppress)
        return None

    async def flush(self) -> None:
        """Every mark written so far committed, or its StoreError raised."""

    async def close(self) -> None:
        pass


class _LockFile:
    """One send per issue at a time. flock is released by the kernel when the process dies."""

    def __init__(self, path: Path, issue: str):
        self.path, self.issue = path, issue

    def __enter__(self):
        try:
            self.file = open(self.path, "a+")
        except OSError as exc:  # the store's folder is read-only, or full
            raise StoreError(f"{self.path}: cannot make the send's lock file beside the store: {exc.strerror}; "
                             "the store's folder must be writable") from exc
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise StoreError(f"another `newsletter send` of {self.issue} is running ({holder}); "
                             "wait for it to finish, or stop it (it resumes where it left off)") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


class _Transaction:
    def __init__(self, db, begin: str):
        self.db, self.begin = db, begin

    def __enter__(self):
        self.db.execute(self.begin)
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            if self.db.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
                self.db.execute("ROLLBACK")
            return
        try:
            self.db.execute("COMMIT")
        except StoreError:
            # A COMMIT that failed (busy, disk full) may leave the transaction open: every later
            # transaction() on this connection would join it and never commit.
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise


# What a store's database may raise beyond StoreError (the web service answers 503).
DB_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error,)
try:
    import psycopg
    DB_ERRORS += (psycopg.Error,)
except ImportError:
    pass


# -- choosing and moving a store -----------------------------------------------------------------

def is_postgres_url(where: str) -> bool:
    return str(where).split(":", 1)[0].lower() in ("postgresql", "postgres")


def open_at(where: str | Path, migrating: bool = False) -> Store:
    """The store at a SQLite path or a postgresql:// URL; `migrating` (store migrate)
    opens a shared store whose schema is older than this tool's."""
    if is_postgres_url(str(where)):
        from .store_pg import PostgresStore
        return PostgresStore(str(where), migrating)
    return Store(where)


def open_store(settings, migrating: bool = False) -> Store:
    """The store the settings name: [store] url when given (PostgreSQL), else [store] path."""
    return open_at(settings.url or settings.path, migrating)


# Every column of every table, in the order copy_store moves them.
TABLES = {
    "subscribers": ("id", "email", "name", "fields", "status", "changed_at", "changed_how"),
    "suppressions": ("email", "reason", "created_at"),
    "deliveries": ("id", "issue", "destination", "email", "name", "fields", "rkey", "state", "fault", "via",
                   "attempts", "reply", "next_try", "updated_at", "claimed_by"),
    "sends": ("issue", "destination", "digest", "source", "started_at"),
    "events": ("source", "event_id", "kind", "email", "received_at"),
}


def table_counts(store: Store) -> dict[str, int]:
    return {table: store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES}


def copy_store(source: Store, target: Store, chunk: int = 5000) -> dict[str, int]:
    """Copy every row of `source` into `target`, which must be empty: the source read in
    one snapshot, the target written in one transaction, which is rolled back unless
    every table's count matches. A store with messages in flight (a send running, or
    one that died and was not resumed) is refused: its copy could send them again."""
    if held := {t: n for t, n in table_counts(target).items() if n}:
        raise StoreError(f"{target.where} is not empty ({', '.join(f'{n} {t}' for t, n in held.items())}): "
                         "copy into a new store")
    with source.snapshot(), target.transaction():
        if flying := source.db.execute("SELECT count(*) FROM deliveries WHERE state = 'sending'").fetchone()[0]:
            raise StoreError(f"{source.where}: {flying} message(s) are in flight (a send is running, or one "
                             "stopped): let it finish, or run `newsletter send` again to settle them, then copy")
        for table, columns in TABLES.items():
            insert = (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})")
            for rows in source.read_table(table, columns, chunk):
                target.db.executemany(insert, rows)
        target.after_copy()
        copied, found = table_counts(source), table_counts(target)
        if copied != found:  # raised inside the transaction: nothing is kept
            raise StoreError(f"the copy does not match: {source.where} has {copied}, {target.where} has {found}")
    return found
