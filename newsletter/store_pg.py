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
  Each run holds a shared advisory lock on a random id of its own on every connection it
  has, for as long as it lives, and claims rows a batch at a time (FOR UPDATE SKIP
  LOCKED, `claimed_by` = its id). A run that dies loses its connections, and so its
  lock: the next run to look takes the lock, makes the dead run's `sending` rows
  uncertain and frees its claims. Starting up (settling, filling the ledger) takes a
  lock on the issue, one run at a time.
- A send talks to the server from its event loop (ServerLedger), which goes on during
  each round trip. Its marks (a message's outcome and the next one's `sending`) go in
  one prepared statement, the marks of several messages in one commit.
- Every statement commits at once unless inside Store.transaction(), so an unsubscribe
  committed by any `serve` is seen by the next batch of every send.

The password never comes from newsletter.toml: libpq reads PGPASSWORD, ~/.pgpass
(PGPASSFILE) or a service file (PGSERVICE, or `?service=` in the URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import re
import secrets
import time
from typing import Iterable
from urllib.parse import parse_qsl, urlsplit

from .errors import StoreError
from .outcome import DELIVERY
from .store import (DUE, SCHEMA_VERSION, SET_STATUS, SUPPRESS, Delivery, Mark, SendLedger, Store, deliveries, now_iso,
                    storable)

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
) WITH (fillfactor = 50);
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

CLAIM = (f"UPDATE deliveries SET claimed_by = ? WHERE id IN (SELECT id FROM deliveries WHERE {DUE}"
         # nobody's: a run's own claims wait in its queue already
         " AND claimed_by IS NULL ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED)"
         " RETURNING id, email, name, fields, rkey, attempts")
BLOCKED = ("SELECT email FROM suppressions WHERE email = ANY(?::citext[]) UNION "
           "SELECT email FROM subscribers WHERE email = ANY(?::citext[]) AND status != 'subscribed'")
# Upgrades of a PostgreSQL store: MIGRATIONS[n] takes schema n to n + 1. The first
# PostgreSQL schema is version 3, so there are none yet.
MIGRATIONS: dict[int, str] = {}

# The first key of the two-key advisory locks this tool takes (a send's own lock uses the
# one-key form, a space of its own); the second is the issue's hash.
LOCK_SPACE = 0x6E6C  # "nl"


def safe_url(url: str) -> str:
    """The URL for messages: any password in it (user:password@, ?password=) replaced."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = parts.query
    if any(key.strip().lower() == "password" for key, _ in parse_qsl(query, keep_blank_values=True)):
        query = "***"
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return parts._replace(netloc=netloc, query=query).geturl()


class _Connection:
    """psycopg behind the few calls Store makes of sqlite3: execute and executemany with
    `?` placeholders, returning a cursor, and in_transaction."""

    def __init__(self, conn, where: str):
        self.conn, self.where = conn, where
        self.open = False  # inside PostgresStore.transaction()

    def execute(self, sql: str, params=()):
        try:
            if not params:  # psycopg reads % signs only when given parameters
                return self.conn.execute(sql)
            return self.conn.execute(_translate(sql), params)
        except (psycopg.Error, UnicodeError) as exc:
            raise self._lost(exc) from None

    def execute_native(self, sql: str, params: list[bytes]) -> None:
        """A statement with $1-style placeholders and parameters already in PostgreSQL's
        text form (as ServerLedger sends them), which the server casts."""
        try:
            psycopg.RawCursor(self.conn).execute(sql, [p.decode("utf-8") for p in params])
        except (psycopg.Error, UnicodeError) as exc:
            raise self._lost(exc) from None

    def executemany(self, sql: str, rows):
        cur = self.conn.cursor()
        try:
            cur.executemany(_translate(sql), rows)
        except psycopg.Error as exc:
            raise self._lost(exc) from None
        return cur

    def _lost(self, exc) -> StoreError:
        """The server went away or refused: what was committed stands, the rest is rolled back."""
        return StoreError(f"{self.where}: the store failed: {_first_line(exc)}")

    @property
    def in_transaction(self) -> bool:
        return self.open or self.conn.info.transaction_status != pq.TransactionStatus.IDLE

    def close(self) -> None:
        self.conn.close()


@functools.lru_cache(maxsize=256)
def _translate(sql: str) -> str:
    """Store's `?` placeholders as psycopg's %s (and the statement's own % signs doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


# What _literal's literals are written for, set on every connection that runs them.
_LITERAL_SETTINGS = "SET standard_conforming_strings TO on; SET client_encoding TO 'UTF8'"


def _text(value: str | None) -> str | None:
    """Text as PostgreSQL can keep it: no NUL (a server's reply is the only text here that
    could carry one) and no lone surrogate (from a provider's JSON)."""
    return None if value is None else storable(value).replace("\x00", "\ufffd")


def _literal(value: str | None) -> str:
    """Text as an SQL literal (suppress_sql's values are all text), for a session with
    standard_conforming_strings on (a backslash is an ordinary character; a quote is
    doubled) in UTF-8."""
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + _text(value).replace("'", "''") + "'"
    raise TypeError(f"no literal for {type(value).__name__}")


_PLACEHOLDERS = re.compile(r"(%%|%s)")


def _bind(sql: str, params) -> str:
    """The statement with its %s placeholders replaced by literals: suppress_sql's
    statements go with the commit in one query string, which takes no parameters."""
    values, end = iter(params), object()
    out = []
    for token in _PLACEHOLDERS.split(sql):  # %% is the statement's own % sign, %s a value
        out.append("%" if token == "%%" else _literal(next(values)) if token == "%s" else token)
    if next(values, end) is not end:
        raise StoreError("more values than placeholders")  # a bug, said plainly
    return "".join(out)


# A send's marks, whatever their states, as one statement: a column's values in an array,
# each row's value at its place. A send's writer prepares it once, with a generic plan
# (send_ledger): parsing and planning were half the server's work a commit when the
# values were literals in the statement, and a custom plan each time cost as much as
# running it (pg_stat_statements, bench/send.py --ledger).
MARKS = """UPDATE deliveries AS d SET state = m.state, reply = coalesce(m.reply, d.reply),
    next_try = m.next_try, updated_at = $8, fault = m.fault, via = coalesce(m.via, d.via),
    attempts = d.attempts + m.attempt,
    claimed_by = CASE WHEN m.state IN ('pending', 'deferred') THEN NULL ELSE d.claimed_by END
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::float8[], $5::text[], $6::text[], $7::int[])
    AS m(id, state, reply, next_try, fault, via, attempt)
WHERE d.id = m.id"""


def marks_parameters(marks: list[Mark]) -> list[bytes]:
    """MARKS's parameters in PostgreSQL's text form: an array a column, then the time.
    A row marked twice (its `sending`, then an outcome that did not wait for it) gets
    both, as two statements would have made it."""
    rows: dict[int, Mark] = {}
    for mark in marks:
        if (earlier := rows.get(mark.id)) is not None:
            mark = mark._replace(reply=earlier.reply if mark.reply is None else mark.reply,
                                 via=mark.via or earlier.via, attempt=earlier.attempt + mark.attempt)
        rows[mark.id] = mark
    marked = rows.values()
    return [_array([int(i) for i in rows]), _array([m.state for m in marked]),
            _array([_text(m.reply) for m in marked]), _array([float(m.next_try) for m in marked]),
            _array([m.fault for m in marked]), _array([m.via for m in marked]),
            _array([int(m.attempt) for m in marked]), now_iso().encode("ascii")]


def _array(values: list) -> bytes:
    """A one-dimensional array in PostgreSQL's text form, for a text-format parameter:
    each text element quoted, with its quotes and backslashes escaped."""
    items = []
    for value in values:
        if value is None:
            items.append("NULL")
        elif isinstance(value, str):
            items.append('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"')
        elif isinstance(value, float) and not math.isfinite(value):
            items.append("NaN" if value != value else "Infinity" if value > 0 else "-Infinity")
        else:
            items.append(repr(value))
    return ("{" + ",".join(items) + "}").encode("utf-8")


def suppress_sql(suppress: Iterable[tuple[str, str]]) -> list[str]:
    """The statements that suppress an address a send's reply condemned, bound as literals."""
    statements = []
    for email, reply in suppress:
        reply, at = storable(reply), now_iso()
        statements.append(_bind(_translate(SUPPRESS), (email, reply, at)))
        statements.append(_bind(_translate(SET_STATUS), ("bounced", at, f"send {reply}", email, "bounced")))
    return statements


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
        if self.where != url:  # store copy's URLs come from the command line, not the settings
            raise StoreError(f"{self.where}: the database password is never taken from a URL: put it in "
                             "PGPASSWORD, ~/.pgpass or a libpq service file")
        try:
            raw = psycopg.connect(url, autocommit=True, connect_timeout=10, application_name="newsletter")
        except psycopg.Error as exc:
            raise StoreError(f"{self.where}: cannot connect to the store: {_first_line(exc)}") from None
        self.db = _Connection(raw, self.where)
        try:
            self.db.execute(_LITERAL_SETTINGS)
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

    def write_marks(self, marks: list[Mark], suppress: Iterable[tuple[str, str]] = ()) -> None:
        statements = suppress_sql(suppress)
        with self.transaction(len(statements) + bool(marks) > 1):
            if marks:
                self.db.execute_native(MARKS, marks_parameters(marks))
            for statement in statements:
                self.db.execute(statement)

    async def send_ledger(self) -> "ServerLedger":
        """Two connections of the send's own, in its event loop: one reads (claims, address
        checks), one writes the marks (MARKS, prepared on it). Each holds the run's lock
        too (sender_lock)."""
        conns = []
        try:
            for _ in range(2):
                conns.append(await psycopg.AsyncConnection.connect(  # no statements of psycopg's own
                    self.url, autocommit=True, connect_timeout=10, application_name="newsletter send",
                    prepare_threshold=None))  # (its cache's DEALLOCATE ALL would take MARKS too)
                await conns[-1].execute("SET synchronous_commit TO off")  # as in sender_lock
                await conns[-1].execute(_LITERAL_SETTINGS)
                await conns[-1].execute("SELECT pg_advisory_lock_shared(%s)", (self.run_id,))
            await conns[1].execute("SET plan_cache_mode TO force_generic_plan")
            await conns[1].execute(f"PREPARE {ServerLedger.MARKS} AS {MARKS}")
        except psycopg.Error as exc:
            for conn in conns:
                with contextlib.suppress(Exception):
                    await conn.close()
            raise StoreError(f"{self.where}: cannot connect to the store: {_first_line(exc)}") from None
        return ServerLedger(self, *conns)

    def transaction(self, needed: bool = True):
        """As Store's; psycopg errors, such as a lost connection, become StoreError."""
        if not needed or self.db.in_transaction:
            return contextlib.nullcontext(self.db)
        return self._transaction()

    @contextlib.contextmanager
    def _transaction(self):
        db = self.db
        db.open = True
        try:
            db.execute("BEGIN")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(StoreError):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.open = False

    def schema_version(self) -> int:
        row = self.db.execute("SELECT to_regclass('newsletter_schema') IS NOT NULL").fetchone()
        if not row[0]:
            return 0
        found = self.db.execute("SELECT max(version) FROM newsletter_schema").fetchone()[0]
        return found or 0

    def _create_or_check(self, migrating: bool) -> None:
        version = self.schema_version()
        if version == 0:
            # Two tools opening a new database at once: one makes the schema. A session
            # lock, taken before the second look, so that the look sees the other's commit.
            with self._schema_lock():
                if self.schema_version() == 0:
                    if self.db.execute("SELECT to_regclass('deliveries') IS NOT NULL").fetchone()[0]:
                        raise StoreError(f"{self.where}: has tables of its own named like the store's "
                                         "(deliveries) but no newsletter_schema: use a database of its own")
                    with self.transaction():
                        for statement in SCHEMA.split(";"):
                            if statement.strip():
                                self.db.execute(statement)
                        self.db.execute("INSERT INTO newsletter_schema (version) VALUES (%d)" % SCHEMA_VERSION)
            version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise self._too_new(version)
        if version < SCHEMA_VERSION and not migrating:
            raise StoreError(f"{self.where}: the store has schema {version}, and this newsletter needs "
                             f"{SCHEMA_VERSION}: run `newsletter store migrate` (once, from any machine; "
                             "tools older than it will then refuse this store)")

    @contextlib.contextmanager
    def _schema_lock(self):
        self.db.execute("SELECT pg_advisory_lock(%d, 0)" % LOCK_SPACE)
        try:
            yield
        finally:
            self.db.execute("SELECT pg_advisory_unlock(%d, 0)" % LOCK_SPACE)

    def migrate(self) -> tuple[int | None, int]:
        with self._schema_lock(), self.transaction():
            version = before = self.schema_version()
            if version > SCHEMA_VERSION:
                raise self._too_new(version)
            while version < SCHEMA_VERSION:
                if version not in MIGRATIONS:
                    raise StoreError(f"{self.where}: this newsletter cannot upgrade schema {version}: upgrade "
                                     "through the release that made the next schema first")
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

    def _in_ledger(self, issue: str, dest: str, emails: list[str]) -> set[str]:
        return {e for (e,) in self.db.execute(
            "SELECT e FROM unnest(?::text[]) AS e WHERE EXISTS (SELECT 1 FROM deliveries WHERE issue = ?"
            " AND destination = ? AND email = e::citext)", (emails, issue, dest))}

    def _add_deliveries(self, rows: list[tuple]) -> int:
        """As Store's, through COPY into a temporary table and one INSERT from it: a
        statement a row cost the server more than the rest of the send's start."""
        with self.transaction():
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS new_deliveries (n BIGSERIAL, issue TEXT, destination TEXT,"
                            " email TEXT, name TEXT, fields TEXT, rkey TEXT, updated_at TEXT) ON COMMIT DELETE ROWS")
            self.db.execute("DELETE FROM new_deliveries")  # an earlier chunk's, inside one caller's transaction
            try:
                with self.db.conn.cursor().copy("COPY new_deliveries (issue, destination, email, name, fields, rkey,"
                                                " updated_at) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
            except (psycopg.Error, UnicodeError) as exc:
                raise self.db._lost(exc) from None
            insert = ("INSERT INTO deliveries (issue, destination, email, name, fields, rkey, updated_at)"
                      " SELECT issue, destination, email, name, fields, rkey, updated_at FROM new_deliveries ORDER BY n")
            # The rows come without duplicates (read_csv drops them, and the subscribers are
            # unique) and without those already in the ledger (_in_ledger): a plain INSERT,
            # without ON CONFLICT's check of each row first (a third of the statement's
            # time, measured), is enough. Two addresses that only the server's lower() calls
            # equal fall back to the check.
            self.db.execute("SAVEPOINT plain")
            try:
                added = self.db.conn.execute(insert).rowcount
                self.db.execute("RELEASE SAVEPOINT plain")
                return added
            except psycopg.errors.UniqueViolation:
                self.db.execute("ROLLBACK TO SAVEPOINT plain")
                return self.db.execute(insert + " ON CONFLICT DO NOTHING").rowcount
            except (psycopg.Error, UnicodeError) as exc:
                raise self.db._lost(exc) from None

    def mark_many(self, ids: list[int], state: str, reply: str | None = None, next_try: float = 0,
                  count_attempt: bool = False, fault: str | None = None, via: str | None = None) -> None:
        # One statement for any number of rows (an array), the same text each time: the
        # server plans it once.
        # A row back to pending or deferred is nobody's until it is claimed again.
        claim = ", claimed_by = NULL" if state in ("pending", "deferred") else ""
        reply = storable(reply)
        self.db.execute(
            "UPDATE deliveries SET state = ?, reply = coalesce(?, reply), next_try = ?, updated_at = ?,"
            f" fault = ?, via = coalesce(?, via), attempts = attempts + ?{claim} WHERE id = ANY(?)",
            (state, reply, next_try, now_iso(), fault, via, 1 if count_attempt else 0, ids))

    def blocked(self, emails: list[str]) -> set[str]:
        return {e.lower() for (e,) in self.db.execute(BLOCKED, (emails, emails))}

    @contextlib.contextmanager
    def snapshot(self):
        db = self.db
        db.open = True
        try:
            db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield db
            finally:
                with contextlib.suppress(StoreError):
                    db.execute("ROLLBACK")
        finally:
            db.open = False

    def read_table(self, table, columns, chunk):
        with self.transaction():  # a server-side cursor lives in a transaction
            try:
                cur = self.db.conn.cursor(name=f"copy_{table}")
                cur.execute(f"SELECT {', '.join(columns)} FROM {table}")
                while rows := cur.fetchmany(chunk):
                    yield rows
                cur.close()
            except psycopg.Error as exc:
                raise self.db._lost(exc) from None

    def after_copy(self) -> None:
        for table in ("subscribers", "deliveries"):
            self.db.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                            f" coalesce((SELECT max(id) FROM {table}), 0) + 1, false)")

    # -- several senders -------------------------------------------------------------------

    @contextlib.contextmanager
    def sender_lock(self, issue: str, dest: str = DELIVERY):
        """This run's own lock, held while it lives: other runs of the issue work beside
        it, and know it is alive while they cannot take the lock. Shared: each of the
        run's connections (AsyncWriter too) holds it, so a run whose first connection is
        lost but whose writers still mark rows is not taken for dead."""
        self.run_id = secrets.randbits(62) + 1
        self.db.execute("SELECT pg_advisory_lock_shared(?)", (self.run_id,))
        # The ledger's marks, as SQLite's WAL with synchronous=NORMAL keeps them: a commit
        # survives this process being killed (the server has it) without waiting for the
        # server's disk, which made every message wait for an fsync (0.25x SQLite's rate).
        # A crash of the database server itself may lose the last moment of marks; rows
        # then read `sending` (uncertain) or, rarely, pending again, as after power loss
        # under SQLite.
        self.db.execute("SET synchronous_commit TO off")
        try:
            yield self
        finally:
            try:
                with contextlib.suppress(StoreError):  # a lost connection released it all already
                    self.db.execute("UPDATE deliveries SET claimed_by = NULL WHERE issue = ? AND destination = ?"
                                    " AND claimed_by = ? AND state IN ('pending', 'deferred')",
                                    (issue, dest, self.run_id))
                    self.db.execute("SELECT pg_advisory_unlock_shared(?)", (self.run_id,))
                    self.db.execute("RESET synchronous_commit")
            finally:
                self.run_id = None

    @contextlib.contextmanager
    def startup_lock(self, issue: str, dest: str = DELIVERY):
        self.db.execute("SELECT pg_advisory_lock(?, hashtext(?))", (LOCK_SPACE, f"{issue}\n{dest}"))
        try:
            yield
        finally:
            with contextlib.suppress(StoreError):
                self.db.execute("SELECT pg_advisory_unlock(?, hashtext(?))", (LOCK_SPACE, f"{issue}\n{dest}"))

    def claim(self, issue: str, batch_size: int, after_id: int = 0, now: float | None = None,
              dest: str = DELIVERY) -> list[Delivery]:
        now = time.time() if now is None else now
        rows = self.db.execute(CLAIM, (self.run_id, issue, dest, after_id, now, batch_size)).fetchall()
        rows.sort()
        return deliveries(rows)

    def healthy(self) -> bool:
        return not (self.db.conn.closed or self.db.conn.broken)

    def check_writable(self) -> None:
        """Nothing to try first: a database server refuses a write when it comes, plainly."""

    def claimed_elsewhere(self, issue: str, dest: str = DELIVERY) -> int:
        """Called when this run found nothing more to claim: a pending row it did not
        claim belongs to another run, or is being claimed by one this very moment (its
        claim not committed yet, so it still looks free). Deferred rows are nobody's: they
        wait for the next run, or for this one's retry."""
        return self.db.execute(
            "SELECT count(*) FROM deliveries WHERE issue = ? AND destination = ? AND state = 'pending'"
            " AND claimed_by IS DISTINCT FROM ?", (issue, dest, self.run_id or 0)).fetchone()[0]


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


class ServerLedger(SendLedger):
    """A send's ledger on the server, from its event loop, which goes on during each round
    trip: claims and address checks on one connection, marks on the other.

    Marks commit in the order they were written, on the one connection; marks written
    while a commit is on its way go together in the next one, in one statement (group
    commit: measured, about two messages a commit with four SMTP connections, five with
    sixteen). Each write's future is done once its commit is; the SMTP client waits
    for it only before the final "." of the next message (sender.py), so the commit
    travels while that message does. After a failed commit every later write fails too:
    a mark must never land when one before it did not."""

    MARKS = "newsletter_marks"  # the writer's prepared MARKS

    def __init__(self, store: PostgresStore, reader, writer):
        super().__init__(store)
        self.reader, self.writer = reader, writer
        self.queue: list[tuple[list[Mark], list[tuple[str, str]], asyncio.Future]] = []
        self.wake = asyncio.Event()
        self.last: asyncio.Future | None = None
        self.failed: Exception | None = None  # a StoreError, or a bug
        self.closing = False
        self.task = asyncio.create_task(self._commit_loop())

    async def claim(self, issue: str, size: int, after_id: int, dest: str) -> list[Delivery]:
        rows = await self._read(CLAIM, (self.store.run_id, issue, dest, after_id, time.time(), size))
        rows.sort()
        return deliveries(rows)

    async def blocked(self, emails: list[str]) -> set[str]:
        return {e.lower() for (e,) in await self._read(BLOCKED, (emails, emails))}

    async def _read(self, sql: str, params) -> list[tuple]:
        try:
            return await (await self.reader.execute(_translate(sql), params)).fetchall()
        except (psycopg.Error, UnicodeError) as exc:
            raise StoreError(f"{self.store.where}: the store failed: {_first_line(exc)}") from None

    def write(self, marks: list[Mark], suppress: Iterable[tuple[str, str]] = ()) -> asyncio.Future:
        done = asyncio.get_running_loop().create_future()
        if self.failed:
            _fail(done, self.failed)
        else:
            self.queue.append((marks, list(suppress), done))
            self.wake.set()
        self.last = done
        return done

    async def flush(self) -> None:
        if self.last is not None:
            await self.last  # commits are in order: the last done, all are

    async def _commit_loop(self) -> None:
        while True:
            while not self.queue:
                if self.closing:
                    return
                self.wake.clear()
                await self.wake.wait()
            taken, self.queue = self.queue, []
            try:  # building the statements too: whatever fails, every waiter hears of it
                marks = [m for marks, _, _ in taken for m in marks]
                statements = suppress_sql([s for _, suppress, _ in taken for s in suppress])
                pgconn = self.writer.pgconn
                if statements:
                    await _run(pgconn, "BEGIN")
                if marks:
                    pgconn.send_query_prepared(self.MARKS.encode("ascii"), marks_parameters(marks))
                    await _results(pgconn)
                if statements:
                    await _run(pgconn, "; ".join([*statements, "COMMIT"]))
            except Exception as exc:  # the server, or a bug: either way no later mark may land
                with contextlib.suppress(Exception):
                    await self.writer.execute("ROLLBACK")
                self.failed = StoreError(f"{self.store.where}: the store failed: {_first_line(exc)}") \
                    if isinstance(exc, (psycopg.Error, UnicodeError)) else exc
                for _, _, done in taken + self.queue:
                    _fail(done, self.failed)
                self.queue = []
            else:
                for _, _, done in taken:
                    done.set_result(None)

    async def close(self) -> None:
        """After the marks written so far are committed (or have failed)."""
        self.closing = True
        self.wake.set()
        with contextlib.suppress(Exception):
            await self.task
        for conn in (self.reader, self.writer):
            with contextlib.suppress(Exception):
                await conn.close()


async def _run(pgconn, sql: str) -> None:
    """One query string on libpq itself, from the event loop: psycopg's cursor cost the
    send's process about 40 us more a commit (bench/send.py --ledger), and the marks
    read nothing back."""
    pgconn.send_query(sql.encode("utf-8"))
    await _results(pgconn)


async def _results(pgconn) -> None:
    """The results of the query just sent, read from the event loop; the first error raised."""
    loop = asyncio.get_running_loop()
    while pgconn.flush():  # a nonblocking connection: the rest goes once the socket takes it
        await _socket_ready(loop, pgconn.socket, loop.add_writer, loop.remove_writer)
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            break
        await _socket_ready(loop, pgconn.socket, loop.add_reader, loop.remove_reader)
    error = None
    while (result := pgconn.get_result()) is not None:
        if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK) and error is None:
            # the server's words, as psycopg gives them (error_message begins "ERROR:  ")
            error = (result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or result.error_message or b""
                     ).decode("utf-8", "replace")
    if error is not None:
        raise psycopg.OperationalError(error.strip() or "the query failed")
    if pgconn.status != pq.ConnStatus.OK:
        raise psycopg.OperationalError((pgconn.error_message or b"").decode("utf-8", "replace").strip()
                                       or "the connection was lost")


async def _socket_ready(loop, fd: int, add, remove) -> None:
    ready = loop.create_future()
    add(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        remove(fd)


def _fail(done: asyncio.Future, error: Exception) -> None:
    done.set_exception(error)
    done.exception()  # its waiter, if any, still gets the error; nobody else is told it was not read


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


