"""`newsletter send`: render once, then hand each recipient's message to a backend through
the ledger, so that a send can stop or crash at any moment and be resumed.

What each answer does to the ledger, the recipient and the run is decided in
outcome.py. Rows left in `sending` (the process died while their message was in flight:
at most one per SMTP connection, or the batches in flight of an API) may have been
delivered: the next run marks them `uncertain` and reports them, and only
`--resend-uncertain` sends them again (with the same Message-ID). A proof written to the
outbox is another destination in the ledger and never counts as a delivery.

Signals: SIGINT or SIGTERM stop the run after the messages in flight; the rest stays
pending for the next run.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .backends import get_backend
from .backends.base import Backend
from .config import Config
from .errors import ConfigError, RecipientsError, SendError, StoreError
from .message import MessageFactory
from .outcome import (DEFERRED, DELIVERY, FAILED, SENDING, SENT, SKIPPED, UNCERTAIN, Breaker, Outcome, decide,
                      destination)
from .reader import read_issue
from .recipients import CsvReport, Recipient, address_problem, normalize, read_csv
from .render import Renderer
from .store import Delivery, Mark, SendLedger, Store, open_store
from .tokens import Signer

SECRET_HELP = ("NEWSLETTER_SECRET is not set; it signs the unsubscribe links. Make one with: "
               "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")


class Progress:
    """Told about each outcome; the CLI draws a bar, tests may count."""

    def start(self, total: int, backend: str) -> None: ...

    def advance(self, state: str, count: int = 1) -> None: ...

    def note(self, text: str) -> None: ...

    def finish(self) -> None: ...


@dataclass
class SendSummary:
    issue: str
    backend: str  # its name
    backend_detail: str = ""  # where it sends: folder, host and port
    destination: str = DELIVERY  # the ledger it writes: proofs (outbox) or deliveries
    counts: dict[str, int] = field(default_factory=dict)  # the ledger after the run
    this_run: dict[str, int] = field(
        default_factory=lambda: {SENT: 0, DEFERRED: 0, FAILED: 0, SKIPPED: 0, UNCERTAIN: 0})
    found_in_flight: list[str] = field(default_factory=list)  # left `sending` by a run that died
    elsewhere: int = 0  # rows not done that another running send of the issue has claimed (PostgreSQL)
    requeued: int = 0  # rows put back by --retry-failed or --resend-uncertain
    csv: CsvReport | None = None
    stopped: str | None = None  # why the run ended early, if it did
    refused: str | None = None  # a refusal that was not the readers' stopped it: what to fix
    built: int = 0  # --dry-run and --test: messages built
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    reasons: dict[tuple[str, str], int] = field(default_factory=dict)  # (failed or uncertain, reply) -> rows


def make_signer(config: Config, allow_ephemeral: bool, warnings: list[str]) -> Signer:
    secret = config.send.secret
    if not secret:
        if not allow_ephemeral:
            raise ConfigError([SECRET_HELP])
        warnings.append("NEWSLETTER_SECRET is not set: using a one-off secret, so the unsubscribe links in "
                        "these messages cannot be checked later. Set it before sending for real.")
        secret = secrets.token_urlsafe(32)
    return Signer(secret.encode("utf-8"), config.publication.list_id)


def send_issue(issue_path: str | Path, config: Config, *, backend_name: str | None = None,
               to_csv: str | Path | None = None, test_addresses: list[str] | None = None,
               dry_run: bool = False, allow_changed: bool = False, retry_failed: bool = False,
               resend_uncertain: bool = False, progress: Progress | None = None,
               backend: Backend | None = None) -> SendSummary:
    progress = progress or Progress()
    issue = read_issue(issue_path)
    rendered = Renderer(config).render(issue)
    backend_name = backend_name or config.send.backend
    dest = destination(backend_name)
    summary = SendSummary(issue.stem, backend_name, destination=dest)
    local = dry_run or backend_name == "outbox" or bool(test_addresses)
    signer = make_signer(config, allow_ephemeral=local, warnings=summary.warnings)
    factory = MessageFactory(rendered, config, signer, test_send=bool(test_addresses))

    if test_addresses:
        # Test messages go to a folder of their own, never among the real send's files.
        backend = backend or get_backend(backend_name, config, f"{issue.stem}-test")
        summary.warnings += backend.warnings()
        return _send_test(factory, signer, test_addresses, backend, summary, dry_run, progress)

    with open_store(config.store) as store:
        if dry_run:
            return _dry_run(store, factory, signer, to_csv, issue.stem, summary, progress)
        # SQLite: the only send of this issue; PostgreSQL: one of any number, claiming rows
        with store.sender_lock(issue.stem, dest):
            with store.startup_lock(issue.stem, dest):
                _check_unchanged(store, issue.stem, factory.digest, str(Path(issue_path).resolve()), allow_changed,
                                 dest)
                summary.found_in_flight = store.settle_in_flight(issue.stem, dest)
                if resend_uncertain:
                    summary.requeued += store.requeue(issue.stem, dest, UNCERTAIN,
                                                      "resent (--resend-uncertain); was: ")
                if retry_failed:
                    summary.requeued += store.requeue(issue.stem, dest, FAILED, "retried (--retry-failed); was: ")
                if to_csv:
                    summary.csv = CsvReport()
                    store.enqueue(issue.stem, read_csv(to_csv, summary.csv), signer.recipient_key, dest=dest)
                else:
                    store.enqueue_subscribers(issue.stem, signer.recipient_key, dest)
            backend = backend or get_backend(backend_name, config, issue.stem)
            summary.backend_detail = backend.describe()
            summary.warnings += backend.warnings()
            try:
                asyncio.run(_deliver(store, issue.stem, dest, factory, backend, config, summary, progress))
            except SendError as exc:
                exc.counts = store.counts(issue.stem, dest)  # what the stop left, for the summary
                raise
            except StoreError as exc:  # the disk filled, or the store became unwritable, mid-send
                raise StoreError(f"{exc}\n{_in_flight_note(store, issue.stem, dest)}") from exc
            finally:
                progress.finish()
            # in this order: other runs only ever make fewer rows pending meanwhile
            summary.elsewhere = 0 if summary.stopped else store.claimed_elsewhere(issue.stem, dest)
            summary.counts = store.counts(issue.stem, dest)
    return summary


def _in_flight_note(store: Store, issue: str, dest: str) -> str:
    """After the ledger failed mid-send: what it says was in flight (the messages whose
    outcome it could not record). Nothing it calls sent was not."""
    rule = ("they stay `sending` in the ledger; the next send reports them as uncertain and does not send them "
            "again (--resend-uncertain does)")
    try:
        emails = [email for email, _ in store.in_flight(issue, dest)]
    except StoreError:
        return f"The messages in flight may have been delivered: {rule}."
    if not emails:
        return "No message was in flight; the rest stays pending for the next send."
    return (f"{len(emails)} message(s) were in flight and may have been delivered: {rule}: "
            + ", ".join(emails[:20]) + (" ..." if len(emails) > 20 else ""))


def _check_unchanged(store: Store, issue: str, digest: str, source: str, allow_changed: bool, dest: str) -> None:
    """A send resumed after the issue was edited would mail two versions of it, and two
    issue files of the same name must never share a ledger."""
    began_with, began_from = store.send_digest(issue, digest, source, replace=allow_changed, dest=dest)
    if began_with == digest:
        if began_from != source:  # the same issue, moved: follow it
            store.send_digest(issue, digest, source, replace=True, dest=dest)
        return
    sent = store.counts(issue, dest)["sent"]
    if not sent:
        store.send_digest(issue, digest, source, replace=True, dest=dest)  # nobody has the old one: start afresh
        return
    if began_from and began_from != source:
        raise StoreError(f"another issue file named {issue} ({began_from}) has already been sent to {sent} "
                         f"reader(s), and {source} is a different issue: give this one a name of its own")
    raise StoreError(f"{issue} has changed since its send began ({sent} already sent): the rest would get "
                     "another version. Send it anyway with --allow-changed, or send the new version under "
                     "a new file name.")


# -- the send loop -----------------------------------------------------------------------------

async def _deliver(store: Store, issue: str, dest: str, factory: MessageFactory, backend: Backend,
                   config: Config, summary: SendSummary, progress: Progress) -> None:
    settings = config.send
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, lambda s=sig: (stop.set(), _note_stop(summary, f"stopped by {s.name}")))
        except (NotImplementedError, RuntimeError):  # not the main thread: no signal handling
            pass
    counts = store.counts(issue, dest)
    progress.start(counts["pending"] + counts["deferred"], backend.describe())
    if not counts["pending"] + counts["deferred"]:
        await backend.close()
        return  # nothing to send: no connection (a finished send needs no server)
    run = _Run(store, issue, dest, factory, backend, settings, summary, progress, stop)

    workers = []
    try:
        await run.start()
        for _ in range(backend.connections):
            workers.append(await backend.open_worker())
        while not stop.is_set():
            await run.one_pass(workers)
            if stop.is_set():
                break
            died, freed = store.settle_peers(issue, dest)
            summary.found_in_flight += died
            if freed:  # another sender of this issue died: its rows are this run's now
                continue
            next_try = store.next_retry(issue, dest)
            if next_try is None:
                break
            wait = next_try - time.time()
            if wait > settings.max_wait:
                _note_stop(summary, f"deferred messages are due in {wait:.0f} s; run send again then")
                break
            progress.note(f"waiting {max(wait, 0):.1f} s to retry deferred messages")
            try:
                await asyncio.wait_for(stop.wait(), max(wait, 0))
            except asyncio.TimeoutError:
                pass
    finally:
        await run.close()
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)
        await backend.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass


def _note_stop(summary: SendSummary, why: str) -> None:
    summary.stopped = summary.stopped or why


class _Run:
    """One send run: a producer reads due rows and builds messages, one task per worker
    sends them, and every answer goes through outcome.decide into the ledger.

    A message goes out only once the ledger says `sending` for it: the commit that says
    so must be done before the SMTP client sends the final "." (the `ready` future of
    Worker.send_batch), so that a crash leaves at most one row in flight a connection.
    The commit also carries the outcome of the connection's message before. SQLite has
    committed by the time the message is built; a database server's commit travels
    while the message does."""

    def __init__(self, store: Store, issue: str, dest: str, factory: MessageFactory, backend: Backend,
                 settings, summary: SendSummary, progress: Progress, stop: asyncio.Event):
        self.store, self.issue, self.dest, self.factory = store, issue, dest, factory
        self.backend, self.settings, self.summary, self.progress, self.stop = (
            backend, settings, summary, progress, stop)
        self.breaker = Breaker(settings.breaker)
        self.ledger: SendLedger | None = None  # opened by start()

    def refuse(self, why: str) -> None:
        """A refusal that would fail everyone alike: stop now, the rest stays pending."""
        self.summary.refused = self.summary.refused or why
        _note_stop(self.summary, why)
        self.stop.set()

    async def one_pass(self, workers) -> None:
        ledger, stop, batch_size = self.ledger, self.stop, self.backend.batch_size
        # Messages wait here already built: a few each for SMTP, one batch each for the APIs
        # (a Postmark batch of 500 complete messages is 20 MB).
        queue: asyncio.Queue = asyncio.Queue(maxsize=len(workers) * (8 if batch_size == 1 else 1))
        handed_back: list = []  # batches taken by a worker that then could not connect: for the others
        fatal: list[BaseException] = []

        async def work(worker):
            ended = [False]  # this worker has taken its end-of-queue None
            try:
                await deliver_from_queue(worker, ended)
            except Exception as exc:  # the store failed, or a bug: stop, but never leave the producer waiting
                fatal.append(exc)
                stop.set()
                while not ended[0]:
                    ended[0] = await queue.get() is None

        async def deliver_from_queue(worker, ended):
            batch = None  # when set: its `sending` mark written, and `ready` the commit's future
            ready = None
            while True:
                if batch is None:
                    if (pause := worker.pause()) and not stop.is_set():
                        try:  # it could not connect: it waits, and takes no work meanwhile
                            await asyncio.wait_for(stop.wait(), pause)
                        except asyncio.TimeoutError:
                            pass
                    if (batch := handed_back.pop(0) if handed_back else await queue.get()) is None:
                        ended[0] = True
                        break
                    if stop.is_set():
                        batch = None
                        continue  # still pending in the ledger: the next run sends it
                    ready = ledger.write(self._sending(batch))
                # The next batch, when one is waiting, is marked `sending` in the same commit
                # as this one's outcomes: one commit a message instead of two on the SMTP path.
                # Taken now, so that SMTP can send its envelope early.
                if stop.is_set() or worker.pause():
                    following = False
                elif handed_back:  # one another connection took and could not send
                    following = handed_back.pop(0)
                else:
                    following = False if queue.empty() else queue.get_nowait()
                ended[0] = following is None
                try:
                    outcomes = await worker.send_batch([message for _, message in batch], ready,
                                                       following[0][1] if following else None)
                    await _committed(ready)  # so that its outcome is written after its `sending`
                except SendError as exc:
                    await _committed(ready)
                    await _committed(ledger.write([Mark(d.id, "pending", f"not sent: {exc}") for d, _ in batch]))
                    fatal.append(exc)
                    stop.set()
                    if following is None:
                        break
                    batch = None
                    continue  # `following` stays pending, as everything else not sent
                if following and worker.pause() and not stop.is_set():
                    handed_back.append(following)  # it could not connect: it waits, the others send this
                    following = False
                if following and stop.is_set():
                    following = False  # stays pending: the next run sends it
                ready, marked = self.record([d for d, _ in batch], outcomes, following or None)
                if following is None:
                    break  # that was the end of the queue
                batch = following if marked else None

        # Alone, a run reads a big batch at a time; beside other senders of the issue, it
        # claims only what its workers will soon send, so that all of them share the list.
        claim_size = max(self.settings.batch_size, batch_size) if not self.store.shared else \
            min(self.settings.batch_size, max(batch_size, 32 * len(workers)))
        tasks = [asyncio.create_task(work(w)) for w in workers]
        try:
            after = 0
            pending: list = []
            while not stop.is_set():
                rows = await ledger.claim(self.issue, claim_size, after, self.dest)
                if not rows:
                    if after and self.store.shared:  # rows skipped while another run held them: look again
                        after = 0
                        continue
                    break
                after = rows[-1].id
                blocked = await ledger.blocked([d.email for d in rows])
                skipped = []
                for delivery in rows:
                    if stop.is_set():
                        break
                    if delivery.email.lower() in blocked:
                        skipped.append(Mark(delivery.id, SKIPPED, "unsubscribed or suppressed before sending"))
                        continue
                    pending.append((delivery, self.factory.build(delivery.email, delivery.name, delivery.rkey,
                                                                 fields=delivery.fields)))
                    if len(pending) == batch_size:
                        await queue.put(pending)
                        pending = []
                if skipped:
                    ledger.write(skipped)  # committed in turn; the pass waits for it at its end
                    self.summary.this_run[SKIPPED] += len(skipped)
                    self.progress.advance(SKIPPED, len(skipped))
            if pending and not stop.is_set():
                await queue.put(pending)
        except BaseException:
            stop.set()  # the store failed (or a bug): the workers take no more from the queue
            raise
        finally:
            for _ in tasks:
                await queue.put(None)
            await asyncio.gather(*tasks)
        if fatal:
            raise fatal[0]
        await ledger.flush()  # what the pass wrote is in the ledger before the run reads it

    def record(self, deliveries: list[Delivery], outcomes: list[Outcome],
               following: list | None = None) -> tuple[asyncio.Future | None, bool]:
        """Write a batch's outcomes as outcome.decide says. One jitter for the batch: its
        deferred rows fall due together and go out again as one batch (for Resend, under
        the same Idempotency-Key). The `following` batch is marked `sending` in the same
        commit unless these outcomes stop the run. Returns the commit's future (None:
        committed) and whether `following` was marked."""
        settings = self.settings
        marks: list[Mark] = []
        suppress: list[tuple[str, str]] = []
        stops: list[str] = []
        now, jitter = time.time(), random.uniform(0.9, 1.1)
        for delivery, outcome in zip(deliveries, outcomes, strict=True):
            decision = decide(outcome, delivery.attempts + 1, settings.max_attempts, settings.retry_delay, now,
                              jitter)
            fault = None if decision.state == SENT else outcome.fault
            marks.append(Mark(delivery.id, decision.state, decision.reply, decision.next_try, fault))
            if decision.suppress:
                suppress.append((delivery.email, decision.reply))
            if decision.stop:
                stops.append(decision.stop)
        why = stops[0] if stops else self.breaker.observe(outcomes)
        marked = bool(following) and not why
        done = self.ledger.write(marks + (self._sending(following) if marked else []), suppress)
        tally: dict[str, int] = {}
        reasons = self.summary.reasons
        for mark in marks:
            tally[mark.state] = tally.get(mark.state, 0) + 1
            if mark.state in (FAILED, UNCERTAIN):
                reasons[mark.state, mark.reply] = reasons.get((mark.state, mark.reply), 0) + 1
        for state, count in tally.items():
            if state in self.summary.this_run:  # not the rows a refusal put back to pending
                self.summary.this_run[state] += count
                self.progress.advance(state, count)
        if why:
            self.refuse(why)
        return done, marked

    def _sending(self, batch: list) -> list[Mark]:
        return [Mark(d.id, SENDING, via=self.backend.name, attempt=1) for d, _ in batch]

    async def start(self) -> None:
        self.ledger = await self.store.send_ledger()

    async def close(self) -> None:
        if self.ledger is not None:
            await self.ledger.close()


async def _committed(done: asyncio.Future | None) -> None:
    if done is not None:
        await done


# -- test sends and dry runs --------------------------------------------------------------------

def _send_test(factory, signer, addresses, backend, summary, dry_run, progress) -> SendSummary:
    for address in addresses:
        if problem := address_problem(address.strip()):
            raise RecipientsError(f"--test {address!r}: {problem}")
    recipients = [normalize(a) for a in addresses]
    messages = [factory.build(a, None, signer.recipient_key(a)) for a in recipients]
    summary.built = len(messages)
    summary.bytes = sum(len(m.data) for m in messages)
    if dry_run:
        return summary

    async def run():
        worker = await backend.open_worker()
        try:
            for message in messages:
                outcome = await worker.send(message)
                summary.this_run[outcome.state] += 1
                progress.advance(outcome.state)
                if outcome.state != SENT:
                    summary.warnings.append(f"{message.recipient}: {outcome.reply}")
        finally:
            await worker.close()
            await backend.close()

    summary.backend_detail = backend.describe()
    progress.start(len(messages), backend.describe())
    try:
        asyncio.run(run())
    finally:
        progress.finish()
    return summary


def _dry_run(store: Store, factory, signer, to_csv, issue: str, summary: SendSummary, progress) -> SendSummary:
    """Build every message that a real send would, keep none of them, write nothing."""
    if to_csv:
        summary.csv = CsvReport()
        recipients: Iterator[Recipient] = read_csv(to_csv, summary.csv)
    else:
        recipients = (Recipient(email, name, json.loads(fields) if fields else {})
                      for email, name, fields, *_ in store.subscribers("subscribed"))
    batch: list[Recipient] = []

    def flush():
        blocked = store.blocked([r.email for r in batch])
        for r in batch:
            if r.email.lower() in blocked or r.status != "subscribed":
                summary.this_run["skipped"] += 1
                continue
            summary.bytes += len(factory.build(r.email, r.name, signer.recipient_key(r.email), fields=r.fields).data)
            summary.built += 1
        batch.clear()

    for recipient in recipients:
        batch.append(recipient)
        if len(batch) >= 500:
            flush()
    flush()
    return summary


@dataclass
class Status:
    destinations: dict[str, dict[str, int]]  # each destination's counts by state
    sent_via: dict[str, int]  # deliveries sent, by backend
    problems: list[tuple]  # (email, state, reply, attempts, fault) of deliveries
    in_flight: list[tuple]  # (email, updated_at) left `sending` by a run that is running or died


def status_of(config: Config, issue: str) -> Status:
    stem = Path(issue).stem if issue.endswith((".yaml", ".yml")) else issue
    with open_store(config.store) as store:
        return Status(store.destinations(stem), store.sent_via(stem), store.problems(stem),
                      store.in_flight(stem))
