"""Whose fault a refusal is, and what it does: the ledger's states and the one outcome policy.

Every answer a send gets (an SMTP reply, a provider's HTTP answer, a connection that
fails) becomes an ``Outcome`` here or in a backend using the helpers here, and ``decide``
turns an Outcome into what happens to the ledger row, the recipient and the run. The rule:

    who is at fault     what happens
    ------------------  -----------------------------------------------------------------
    nobody (accepted)   the row is sent
    the recipient       permanent: failed; the address is suppressed and the subscriber
                        bounced only for "this mailbox does not exist" (5.1.1, 5.1.2,
                        5.1.3, 5.1.6, 5.1.10, 5.2.1, a provider's inactive recipient).
                        temporary (mailbox full, greylisting): deferred, retried later
    the message         content refused (5.6.x, 5.7.x at DATA, too big): the run stops at
                        once; the row goes back to pending, as does everyone not yet tried
    the sender/account  (5.1.7, 5.1.8, relay denied, 530 5.7.0, 5.7.8, 554 at the
                        greeting, any refusal at MAIL FROM, a refused API key, SES's
                        MessageRejected): the run stops at once, the row back to pending
    the server          temporary (4xx, a dropped connection before the message went out):
                        deferred with backoff; permanent and unexplained (a 5xx that names
                        no one): failed, never suppressed, `send --retry-failed` retries it
    nobody knows        the message may have been delivered (a drop after it went out, an
                        API timeout or 5xx without an idempotency key, a kill mid-send):
                        uncertain; never resent by itself, `send --resend-uncertain` does

A proof (the outbox, ``--test``) is never a delivery: see ``destination``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# -- the ledger's states -----------------------------------------------------------------------

PENDING, SENDING, SENT, DEFERRED, FAILED, SKIPPED, UNCERTAIN = (
    "pending", "sending", "sent", "deferred", "failed", "skipped", "uncertain")
STATES = (PENDING, SENDING, SENT, DEFERRED, FAILED, SKIPPED, UNCERTAIN)

# -- who is at fault ---------------------------------------------------------------------------

RECIPIENT, MESSAGE, SENDER, SERVER = "recipient", "message", "sender", "server"
FAULTS = (RECIPIENT, MESSAGE, SENDER, SERVER)
STOPS_THE_RUN = (MESSAGE, SENDER)  # would fail everyone alike: never burn through the list

# -- where a message goes ----------------------------------------------------------------------

PROOF, DELIVERY = "outbox", "mail"  # ledger destinations: a proof never counts as a delivery


def destination(backend_name: str) -> str:
    return PROOF if backend_name == "outbox" else DELIVERY


@dataclass(frozen=True)
class Outcome:
    state: str  # sent, deferred, failed or uncertain: what the server's answer says
    reply: str  # the server's words, for the ledger and `status`
    fault: str | None = None  # who is at fault for anything but sent
    suppress: bool = False  # this address does not exist: never send to it again
    retry_after: float | None = None  # deferred: not before this many seconds (a provider's word)
    code: str = ""  # what the refusal was ("550 5.1.1", "Postmark 406"): the breaker compares these
    may_have_gone: bool = False  # deferred only because an idempotency key makes asking again safe

    @property
    def stops_run(self) -> bool:
        return self.state != SENT and self.fault in STOPS_THE_RUN


def accepted(reply: str) -> Outcome:
    return Outcome(SENT, reply)


def uncertain(reply: str, code: str = "uncertain") -> Outcome:
    """`code` names the kind ("SendGrid HTTP 500"), so that the breaker sees a run of them."""
    return Outcome(UNCERTAIN, reply, SERVER, code=code)


def unreachable(reply: str) -> Outcome:
    """The server could not be reached or dropped us before the message went out."""
    return Outcome(DEFERRED, reply, SERVER, code="unreachable")


# -- SMTP: by command and enhanced status code (RFC 3463, 5248, 7372, 7505) ---------------------

GREETING, EHLO, AUTH, MAIL, RCPT, DATA = "greeting", "ehlo", "auth", "mail", "rcpt", "data"

# subject.detail of X.subject.detail
_NO_SUCH_MAILBOX = {"1.1", "1.2", "1.3", "1.6", "1.10", "2.1"}  # bad mailbox or domain, disabled
_RECIPIENT_PASSING = {"2.2", "2.0"}  # mailbox full or busy: the reader's, but it passes
_SENDER = {"1.7", "1.8", "7.0", "7.8", "7.9", "7.11", "7.13", "7.14", "7.20", "7.21", "7.22", "7.23",
           "7.24", "7.25", "7.26", "7.27", "5.1", "5.2", "5.3", "5.4", "5.5", "5.6"}
# 5.5.x is a protocol error: our client, i.e. the sending side
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
_RELAY_OR_BLOCK = re.compile(r"relay|client host|blocked|block ?list|black ?list|spamhaus|reputation|"
                             r"not permitted to send|authentication required", re.I)
_UNKNOWN_USER = re.compile(r"user unknown|unknown user|no such (user|mailbox|recipient)|does not exist|"
                           r"mailbox (unavailable|not found)|recipient (address )?rejected: user unknown|"
                           r"invalid recipient|address rejected", re.I)


def enhanced_code(text: str) -> str | None:
    """"5.1.1" from a reply text that starts with one."""
    found = _ENHANCED.match(text)
    return found.group(0) if found else None


def smtp_outcome(code: int, text: str, stage: str = RCPT) -> Outcome:
    """What an SMTP reply to `stage` means. 2xx sent; otherwise who is at fault decides."""
    reply = f"{code} {text}".strip()
    if 200 <= code < 400:
        return accepted(reply)
    enhanced = enhanced_code(text)
    detail = enhanced.split(".", 1)[1] if enhanced else ""
    key = f"{code} {enhanced}" if enhanced else str(code)
    temporary = code < 500 or (enhanced or "").startswith("4.")
    fault = _fault(code, detail, text, stage, temporary)
    if temporary:
        return Outcome(DEFERRED, reply, fault, code=key)
    if fault == RECIPIENT and detail in _RECIPIENT_PASSING:
        return Outcome(FAILED, reply, RECIPIENT, code=key)
    # suppressed only for an answer at RCPT (DESIGN): after DATA it fails, and is never suppressed
    return Outcome(FAILED, reply, fault, suppress=fault == RECIPIENT and stage == RCPT, code=key)


def _fault(code: int, detail: str, text: str, stage: str, temporary: bool) -> str:
    if temporary:  # it may pass: only a sender that is wrong for now stops the run
        if detail in ("1.7", "1.8"):
            return SENDER
        return RECIPIENT if stage == RCPT and detail in _RECIPIENT_PASSING else SERVER
    if detail in _SENDER or code == 530:
        return SENDER
    if stage in (GREETING, EHLO, AUTH, MAIL):
        return SENDER  # 554 at the greeting, a refused HELO name, login or sender: it is us
    if stage == DATA:
        # One recipient a transaction: a reply that names the mailbox (5.1.x addressing, 5.2.2
        # full, a server that checks them only once the content is in) is this reader's; as
        # the message's fault the run would stop at them, first in line, on every run.
        if detail in _NO_SUCH_MAILBOX or detail in _RECIPIENT_PASSING:
            return RECIPIENT
        return MESSAGE  # the content (5.6.x, 5.7.x, 5.3.4, 552): the same for every reader
    # RCPT
    if detail in _NO_SUCH_MAILBOX or detail in _RECIPIENT_PASSING:
        return RECIPIENT
    if _RELAY_OR_BLOCK.search(text):
        return SENDER  # "Relay access denied", "Client host rejected": it is us, not them
    if not detail and code in (550, 551, 553) and _UNKNOWN_USER.search(text):
        return RECIPIENT  # an old server without enhanced codes, saying the mailbox is unknown
    return SERVER  # a refusal that names no one: never suppresses; the breaker watches for repeats


# -- the policy --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    state: str  # what the ledger row becomes
    reply: str
    next_try: float = 0.0  # for deferred rows: when (epoch seconds)
    suppress: bool = False  # suppress the address and mark the subscriber bounced
    stop: str | None = None  # why the run must stop now, in words that say what to fix


def decide(outcome: Outcome, attempts: int, max_attempts: int, retry_delay: float, now: float,
           jitter: float = 1.0) -> Decision:
    """The one place an Outcome becomes a ledger state, a suppression, or a stop.
    `attempts` counts this one."""
    if outcome.stops_run:
        return Decision(PENDING, outcome.reply, stop=advice(outcome))
    if outcome.state == DEFERRED:
        if attempts >= max_attempts:
            if outcome.may_have_gone:  # an idempotency key lasts a day at most: never retried blindly later
                return Decision(UNCERTAIN, f"gave up after {attempts} attempts; it may have been delivered; "
                                           f"last reply: {outcome.reply}")
            return Decision(FAILED, f"gave up after {attempts} attempts; last reply: {outcome.reply}")
        delay = max(retry_delay * (2 ** (attempts - 1)) * jitter, outcome.retry_after or 0.0)
        return Decision(DEFERRED, outcome.reply, next_try=now + delay)
    return Decision(outcome.state, outcome.reply, suppress=outcome.suppress)


def advice(outcome: Outcome) -> str:
    """Why the run stopped, and what to fix, for a refusal that is not the recipient's."""
    reply = outcome.reply
    if outcome.fault == MESSAGE:
        return (f"the server refused the message itself ({reply}); every reader would get the same answer. "
                "Change the issue (its content or size) and run send again: nobody has been marked failed")
    detail = (enhanced_code(reply.split(" ", 1)[-1]) or "").split(".", 1)[-1]
    api_fix = _api_fix(outcome)
    if api_fix:
        what = api_fix
    elif detail in ("1.7", "1.8") or "sender" in reply.lower():
        what = "the sender address was refused: check [sender] address (its domain must exist and be allowed " \
               "to send through this server or provider)"
    elif detail in ("7.0", "7.8", "7.9", "7.11") or reply.startswith("530"):
        what = "the server wants a (different) login: check [smtp] username and NEWSLETTER_SMTP_PASSWORD"
    elif "relay" in reply.lower():
        what = "the server will not relay for us: log in (smtp.username) or send through your own relay"
    else:
        what = "the sending account or this machine was refused"
    return f"{what} ({reply}). Nobody has been marked failed; run send again once it is fixed"


# An HTTP API's refusal (its code names the provider: "SES MessageRejected", "SendGrid 403"), by
# the provider's words, first match wins -> what to fix.
_API_FIXES = (
    (re.compile(r"not verified|verified sender|sender identity|sender signature|MailFromDomain", re.I),
     "the provider has not verified the sender: verify [sender] address (or its domain) with the provider "
     "(Amazon SES: in this region; in the SES sandbox every recipient must be verified too)"),
    (re.compile(r"quota|paused|suspended|not allowed to send|may not send|account is pending|LimitExceeded", re.I),
     "the provider will not let this account send now (a sending quota reached, sending paused or the account "
     "suspended or pending): see the provider's console; the rest waits"),
    (re.compile(r"API response 40[13]\b"),
     "the provider refused the API key: check NEWSLETTER_<BACKEND>_API_KEY and its permissions "
     "(Amazon SES: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and [ses] region)"),
    (re.compile(r"API response 404\b|stream|configuration set|NotFound", re.I),
     "the provider does not know a name in the settings: check base_url, [mailgun] domain, "
     "[postmark] message_stream, [ses] configuration_set and region"),
)


def _api_fix(outcome: Outcome) -> str | None:
    if not outcome.code[:1].isalpha() or " " not in outcome.code:  # SMTP codes are digits
        return None
    return next((fix for pattern, fix in _API_FIXES if pattern.search(outcome.reply)), None)


class Breaker:
    """Stops a run when the same refusal comes back for `limit` recipients in a row: a
    server saying the same thing to everyone is about the server or us, not the readers."""

    def __init__(self, limit: int):
        self.limit = limit
        self.code: str | None = None
        self.count = 0

    def observe(self, outcomes: list[Outcome]) -> str | None:
        """A batch's outcomes, in order. One answer for a whole API request counts once."""
        if not self.limit or not outcomes:
            return None
        if len(outcomes) > 1 and all(o is outcomes[0] for o in outcomes):
            outcomes = outcomes[:1]
        for outcome in outcomes:
            if outcome.state not in (FAILED, UNCERTAIN) or not outcome.code:
                self.code, self.count = None, 0
            elif outcome.code == self.code:
                self.count += 1
            else:
                self.code, self.count = outcome.code, 1
            if self.count >= self.limit:
                return self._why(outcome)
        return None

    def _why(self, outcome: Outcome) -> str:
        if outcome.state == UNCERTAIN:
            return (f"the same answer came back for {self.count} requests in a row ({outcome.reply}); they may or "
                    "may not have been delivered, so the run stopped. Check with `newsletter status`; once the "
                    "provider answers again, `newsletter send --resend-uncertain` sends them")
        return (f"the same answer came back for {self.count} recipients (or requests) in a row ({outcome.reply}); "
                "this looks like the server or the sending account, not the readers, so the run stopped. "
                "Check with `newsletter status`; put back anyone suppressed by it with "
                f"`newsletter subscribers restore --reply '{self.code}'`, then `newsletter send --retry-failed`")


# -- what comes back after a send: one-click unsubscribes, bounces, complaints ----------------

UNSUBSCRIBE, HARD_BOUNCE, SOFT_BOUNCE, COMPLAINT = "unsubscribe", "hard_bounce", "soft_bounce", "complaint"
EVENT_KINDS = (UNSUBSCRIBE, HARD_BOUNCE, SOFT_BOUNCE, COMPLAINT)


@dataclass(frozen=True)
class Event:
    """Something a reader, a provider or a bounce mail says about one address, whichever
    door it came in by (the one-click endpoint, a webhook, the bounce mailbox)."""

    kind: str  # one of EVENT_KINDS
    email: str
    source: str  # where it came from, for the store's history: "one-click", "sendgrid webhook", "dsn"
    reason: str = ""  # the provider's or the server's words
    event_id: str | None = None  # the source's own id: the same event twice changes nothing twice
    issue: str | None = None  # the issue whose message it answers, when known


@dataclass(frozen=True)
class EventEffect:
    status: str | None  # the subscriber's new status, or None to leave it
    suppress: bool  # never send to the address again
    ledger_state: str | None  # what the issue's delivery row becomes, or None to leave it


def event_effect(event: Event) -> EventEffect:
    """Only the reader's own permanent failure, their complaint or their unsubscribe
    touches their standing; a soft bounce changes nothing (the next send tries again)."""
    if event.kind == UNSUBSCRIBE:
        return EventEffect("unsubscribed", False, None)
    if event.kind == HARD_BOUNCE:
        return EventEffect("bounced", True, FAILED)  # accepted, then bounced: it never arrived
    if event.kind == COMPLAINT:
        return EventEffect("complained", True, None)  # it arrived; they do not want it
    if event.kind == SOFT_BOUNCE:
        return EventEffect(None, False, None)
    raise ValueError(f"unknown event kind {event.kind!r}")


def bounce_kind(status: str, diagnostic: str, delayed: bool = False) -> str | None:
    """What a bounce reported after the send (a DSN's Status and Diagnostic-Code, a
    provider's bounce event) means: HARD_BOUNCE, SOFT_BOUNCE, or None for a refusal that is
    not the reader's fault, by the same rule as a send's own replies (smtp_outcome at RCPT)."""
    status = enhanced_code(status.strip()) or ""
    if delayed or status.startswith("4."):
        return SOFT_BOUNCE
    diag = re.match(r"\s*(?:smtp|x-[\w-]+)?\s*;?\s*([245][0-9][0-9])?[ -]*(.*)", diagnostic, re.S | re.I)
    code, words = (diag.group(1), diag.group(2)) if diag else (None, diagnostic)
    if not code or code[0] != (status or code)[0]:
        code = "550" if status.startswith("5.") or not status else "450"
    words = " ".join(words.split())
    text = f"{status} {words}" if status and not words.startswith(status) else words
    outcome = smtp_outcome(int(code), text, RCPT)
    if outcome.suppress:
        return HARD_BOUNCE
    if outcome.fault == RECIPIENT or outcome.state == "deferred":
        return SOFT_BOUNCE
    return None
