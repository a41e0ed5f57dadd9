"""The store in PostgreSQL, for a newsletter whose `send`, `serve` and `inbox` run on
different machines, or several `serve` instances behind one address.

It runs Store's own SQL (store.py) through psycopg 3, with what PostgreSQL does
differently here:

- Email columns are citext: the same address in another case is the same reader, as
  SQLite's COLLATE NOCASE makes it there.
- The schema's version is a row of `newsletter_schema`. A new database gets the whole
  schema; an older one is upgraded only by `newsletter store migrate`, since other
  machines may still run the tool that made it, and a newer one is refused.
- Several `send` processes of one issue split the list instead of refusing each other.
  Each run holds a session advisory lock on a random id of its own for as long as it
  lives, and claims rows a batch at a time (FOR UPDATE SKIP LOCKED, `claimed_by` = its
  id). A run that dies loses its connection, and so its lock: the next run to look finds
  the lock free, makes the dead run's `sending` rows uncertain and frees its claims.
  Starting up (settling, filling the ledger) takes a lock on the issue, one run at a time.
- Every statement commits at once unless inside Store.transaction(), so an unsubscribe
  committed by any `serve` is seen by the next batch of every send.

The password never comes from newsletter.toml: libpq reads PGPASSWORD, ~/.pgpass
(PGPASSFILE) or a service file (PGSERVICE, or `?service=` in the URL).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from urllib.parse import urlsplit

from .errors import StoreError
from .outcome import DELIVERY
from .store import SCHEMA_VERSION, Delivery, Store, now_iso

try:
    import psycopg
    from psycopg import pq
except ImportError:  # an optional dependency: only a PostgreSQL store needs it
    psycopg = None

SCHEMA = """
CREATE EXTENSION IF NOT EXISTS citext;
CREATE TABLE subscribers (
    id          BIGSERIAL PRIMARY KEY,
    email       CITEXT NOT NULL UNIQUE,
    name        TEXT,
    fields      TEXT,
    status      TEXT NOT NULL DEFAULT 'subscribed'
                CHECK (status IN ('subscribed', 'unsubscribed', 'bounced', 'complained')),
    changed_at  TEXT NOT NULL,
    changed_how TEXT NOT NULL
);
CREATE TABLE suppressions (
    email       CITEXT PRIMARY KEY,
    reason      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE deliveries (
    id          BIGSERIAL PRIMARY KEY,
    issue       TEXT NOT NULL,
    destination TEXT NOT NULL DEFAULT 'mail' CHECK (destination IN ('mail', 'outbox')),
    email       CITEXT NOT NULL,
    name        TEXT,
    fields      TEXT,
    rkey        TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'sending', 'sent', 'deferred', 'failed', 'skipped', 'uncertain')),
    fault       TEXT,
    via         TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    reply       TEXT,
    next_try    DOUBLE PRECISION NOT NULL DEFAULT 0,
    updated_at  TEXT NOT NULL,
    claimed_by  BIGINT,
    UNIQUE (issue, destination, email)
);
CREATE INDEX deliveries_by_send ON deliveries (issue, destination, id);
CREATE INDEX deliveries_by_rkey ON deliveries (rkey);
CREATE TABLE sends (
    issue       TEXT NOT NULL,
    destination TEXT NOT NULL DEFAULT 'mail',
    digest      TEXT NOT NULL,
    source      TEXT,
    started_at  TEXT NOT NULL,
    PRIMARY KEY (issue, destination)
);
CREATE TABLE events (
    source      TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    email       CITEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (source, event_id)
);
CREATE TABLE newsletter_schema (version INTEGER NOT NULL);
"""

# Upgrades of a PostgreSQL store: MIGRATIONS[n] takes schema n to n + 1. The first
# PostgreSQL schema is version 3, so there are none yet.
MIGRATIONS: dict[int, str] = {}

# The first key of the two-key advisory locks this tool takes (a send's own lock uses the
# one-key form, a space of its own); the second is the issue's hash.
LOCK_SPACE = 0x6E6C  # "nl"


def safe_url(url: str) -> str:
    """The URL for messages: any password in it replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class _Connection:
    """psycopg behind the few calls Store makes of sqlite3: execute and executemany with
    `?` placeholders, returning a cursor, and in_transaction."""

    def __init__(self, conn, where: str):
        self.conn, self.where = conn, where
        self._sql: dict[str, str] = {}

    def _translate(self, sql: str) -> str:
        found = self._sql.get(sql)
        if found is None:
            found = self._sql[sql] = sql.replace("%", "%%").replace("?", "%s")
        return found

    def execute(self, sql: str, params=()):
        try:
            if not params:  # psycopg reads % signs only when given parameters
                return self.conn.execute(sql)
            return self.conn.execute(self._translate(sql), params)
        except psycopg.Error as exc:
            raise self._lost(exc) from None

    def executemany(self, sql: str, rows):
        cur = self.conn.cursor()
        try:
            cur.executemany(self._translate(sql), rows)
        except psycopg.Error as exc:
            raise self._lost(exc) from None
        return cur

    def _lost(self, exc) -> StoreError:
        """The server went away or refused: what was committed stands, the rest is rolled back."""
        return StoreError(f"{self.where}: the store failed: {_first_line(exc)}")

    @property
    def in_transaction(self) -> bool:
        return self.conn.info.transaction_status != pq.TransactionStatus.IDLE

    def close(self) -> None:
        self.conn.close()


class PostgresStore(Store):
    kind = "PostgreSQL"
    shared = True
    _begin = "BEGIN"
    _contains = "strpos({}, {}) > 0"

    def __init__(self, url: str, migrating: bool = False):
        self.url = url
        self.where = safe_url(url)
        self.path = None
        self.upgraded_from = None
        self.run_id: int | None = None  # set while this store's connection runs a send
        if psycopg is None:
            raise StoreError(f"{self.where}: a PostgreSQL store needs psycopg: "
                             "pip install 'newsletter[postgresql]'")
        try:
            raw = psycopg.connect(url, autocommit=True, connect_timeout=10, application_name="newsletter")
        except psycopg.Error as exc:
            raise StoreError(f"{self.where}: cannot connect to the store: {_first_line(exc)}") from None
        self.db = _Connection(raw, self.where)
        try:
            self._create_or_check(migrating)
        except psycopg.Error as exc:
            self.close()
            raise StoreError(f"{self.where}: cannot open the store: {_first_line(exc)}") from None
        except StoreError:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.db.close()

    def schema_version(self) -> int:
        row = self.db.execute("SELECT to_regclass('newsletter_schema') IS NOT NULL").fetchone()
        if not row[0]:
            return 0
        found = self.db.execute("SELECT max(version) FROM newsletter_schema").fetchone()[0]
        return found or 0

    def _create_or_check(self, migrating: bool) -> None:
        version = self.schema_version()
        if version == 0:
            with self.transaction():
                # two tools opening a new database at once: one makes the schema
                self.db.execute("SELECT pg_advisory_xact_lock(%d, 0)" % LOCK_SPACE)
                if self.schema_version() == 0:
                    if self.db.execute("SELECT to_regclass('deliveries') IS NOT NULL").fetchone()[0]:
                        raise StoreError(f"{self.where}: has tables of its own named like the store's "
                                         "(deliveries) but no newsletter_schema: use a database of its own")
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            self.db.execute(statement)
                    self.db.execute("INSERT INTO newsletter_schema (version) VALUES (%d)" % SCHEMA_VERSION)
            version = SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            raise self._too_new(version)
        if version < SCHEMA_VERSION and not migrating:
            raise StoreError(f"{self.where}: the store has schema {version}, and this newsletter needs "
                             f"{SCHEMA_VERSION}: run `newsletter store migrate` (once, from any machine; "
                             "tools older than it will then refuse this store)")

    def migrate(self) -> tuple[int | None, int]:
        before = self.schema_version()
        with self.transaction():
            self.db.execute("SELECT pg_advisory_xact_lock(%d, 0)" % LOCK_SPACE)
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise self._too_new(version)
            while version < SCHEMA_VERSION:
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                version += 1
            self.db.execute("UPDATE newsletter_schema SET version = %d" % version)
        return (before if before != version else None), version

    # -- the ledger, where PostgreSQL differs ----------------------------------------------

    def enqueue_subscribers(self, issue: str, key_of, dest: str = DELIVERY) -> int:
        """As Store's, with the recipient keys made here: the server cannot call Python."""
        added, stamp = 0, now_iso()
        while True:
            with self.transaction():
                rows = self.db.execute(
                    "SELECT s.email, s.name, s.fields FROM subscribers s WHERE s.status = 'subscribed'"
                    " AND NOT EXISTS (SELECT 1 FROM suppressions x WHERE x.email = s.email)"
                    " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.issue = ? AND d.destination = ?"
                    " AND d.email = s.email) ORDER BY s.email LIMIT 5000", (issue, dest)).fetchall()
                if not rows:
                    return added
                cur = self.db.executemany(
                    "INSERT INTO deliveries (issue, destination, email, name, fields, rkey, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [(issue, dest, email, name, fields, key_of(email), stamp) for email, name, fields in rows])
                added += cur.rowcount

    def mark_many(self, ids: list[int], state: str, reply: str | None = None, next_try: float = 0,
                  count_attempt: bool = False, fault: str | None = None, via: str | None = None) -> None:
        # One statement for any number of rows (an array), the same text each time: the
        # server plans it once.
        self.db.execute(
            "UPDATE deliveries SET state = ?, reply = coalesce(?, reply), next_try = ?, updated_at = ?,"
            " fault = ?, via = coalesce(?, via), attempts = attempts + ? WHERE id = ANY(?)",
            (state, reply, next_try, now_iso(), fault, via, 1 if count_attempt else 0, ids))

    def blocked(self, emails: list[str]) -> set[str]:
        rows = self.db.execute(
            "SELECT email FROM suppressions WHERE email = ANY(?::citext[]) UNION "
            "SELECT email FROM subscribers WHERE email = ANY(?::citext[]) AND status != 'subscribed'",
            (emails, emails))
        return {e.lower() for (e,) in rows}

    def read_table(self, table, columns, chunk):
        with self.transaction():  # a server-side cursor lives in a transaction
            cur = self.db.conn.cursor(name=f"copy_{table}")
            cur.execute(f"SELECT {', '.join(columns)} FROM {table}")
            while rows := cur.fetchmany(chunk):
                yield rows
            cur.close()

    def after_copy(self) -> None:
        for table in ("subscribers", "deliveries"):
            self.db.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                            f" coalesce((SELECT max(id) FROM {table}), 0) + 1, false)")

    # -- several senders -------------------------------------------------------------------

    @contextlib.contextmanager
    def sender_lock(self, issue: str, dest: str = DELIVERY):
        """This run's own lock, held while it lives: other runs of the issue work beside
        it, and know it is alive while they cannot take the lock."""
        self.run_id = secrets.randbits(62) + 1
        self.db.execute("SELECT pg_advisory_lock(?)", (self.run_id,))
        try:
            yield self
        finally:
            with contextlib.suppress(psycopg.Error):  # a lost connection released it all already
                self.db.execute("UPDATE deliveries SET claimed_by = NULL WHERE issue = ? AND destination = ?"
                                " AND claimed_by = ? AND state IN ('pending', 'deferred')",
                                (issue, dest, self.run_id))
                self.db.execute("SELECT pg_advisory_unlock(?)", (self.run_id,))
            self.run_id = None

    @contextlib.contextmanager
    def startup_lock(self, issue: str, dest: str = DELIVERY):
        self.db.execute("SELECT pg_advisory_lock(?, hashtext(?))", (LOCK_SPACE, f"{issue}\n{dest}"))
        try:
            yield
        finally:
            with contextlib.suppress(psycopg.Error):
                self.db.execute("SELECT pg_advisory_unlock(?, hashtext(?))", (LOCK_SPACE, f"{issue}\n{dest}"))

    def claim(self, issue: str, batch_size: int, after_id: int = 0, now: float | None = None,
              dest: str = DELIVERY) -> list[Delivery]:
        now = time.time() if now is None else now
        rows = self.db.execute(
            "UPDATE deliveries SET claimed_by = ? WHERE id IN (SELECT id FROM deliveries"
            " WHERE issue = ? AND destination = ? AND id > ?"
            " AND (state = 'pending' OR (state = 'deferred' AND next_try <= ?))"
            " AND (claimed_by IS NULL OR claimed_by = ?)"
            " ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED)"
            " RETURNING id, email, name, fields, rkey, attempts",
            (self.run_id, issue, dest, after_id, now, self.run_id, batch_size)).fetchall()
        rows.sort()
        return [Delivery(i, e, n, json.loads(f) if f else {}, k, a) for i, e, n, f, k, a in rows]

    def claimed_elsewhere(self, issue: str, dest: str = DELIVERY) -> int:
        return self.db.execute(
            "SELECT count(*) FROM deliveries WHERE issue = ? AND destination = ? AND claimed_by IS NOT NULL"
            " AND claimed_by != ? AND state IN ('pending', 'deferred')", (issue, dest, self.run_id or 0)).fetchone()[0]

    def next_retry(self, issue: str, dest: str = DELIVERY) -> float | None:
        """The next deferred row due that this run may take (another live run retries its own)."""
        return self.db.execute(
            "SELECT min(next_try) FROM deliveries WHERE issue = ? AND destination = ? AND state = 'deferred'"
            " AND (claimed_by IS NULL OR claimed_by = ?)", (issue, dest, self.run_id or 0)).fetchone()[0]

    def settle_in_flight(self, issue: str, dest: str = DELIVERY) -> list[str]:
        """The rows of runs that are gone: their `sending` rows settled as Store does,
        their claims freed. A run still alive (its lock held) keeps its rows."""
        return self.settle_peers(issue, dest)[0]

    def settle_peers(self, issue: str, dest: str = DELIVERY) -> tuple[list[str], int]:
        found, freed = [], 0
        with self.transaction():  # rows from a store copied from SQLite, or a send that predates claims
            found += [e for (e,) in self._settle(issue, dest, " AND claimed_by IS NULL RETURNING email")]
        owners = self.db.execute(
            "SELECT DISTINCT claimed_by FROM deliveries WHERE issue = ? AND destination = ?"
            " AND claimed_by IS NOT NULL AND claimed_by != ? AND state IN ('pending', 'deferred', 'sending')",
            (issue, dest, self.run_id or 0)).fetchall()
        for (owner,) in owners:
            if not self.db.execute("SELECT pg_try_advisory_lock(?)", (owner,)).fetchone()[0]:
                continue  # alive, or being settled by another run right now
            try:
                with self.transaction():
                    found += [e for (e,) in self._settle(issue, dest, " AND claimed_by = ? RETURNING email",
                                                         owner)]
                    freed += self.db.execute(
                        "UPDATE deliveries SET claimed_by = NULL WHERE issue = ? AND destination = ?"
                        " AND claimed_by = ? AND state IN ('pending', 'deferred')", (issue, dest, owner)).rowcount
            finally:
                self.db.execute("SELECT pg_advisory_unlock(?)", (owner,))
        return sorted(found), freed + len(found)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


