"""`newsletter inbox`: what comes back by mail, read from the bounce mailbox over IMAP.

Each message in [inbox] folder is one of:

    a DSN (RFC 3464: multipart/report; report-type=delivery-status), read by the stdlib email
        parser, one verdict per recipient block, through outcome.smtp_outcome as if the
        Status and Diagnostic-Code had been the reply to RCPT:
            Action delayed, or a 4.x.x Status                -> soft bounce (changes nothing)
            Action failed, 5.x.x, this mailbox does not exist -> hard bounce (suppressed, bounced,
                                                                the issue's ledger row failed)
            Action failed, 5.x.x, the sender's or the server's fault (5.1.8, 5.7.1 relay
            denied...) -> nobody is touched: reported, because the sending needs fixing
    a bounce in another format (an automatic mail that flufl.bounce, GNU Mailman's bounce
        detectors, finds failed addresses in): the first SMTP reply in its text decides, as above
    an ARF report (RFC 5965: report-type=feedback-report, Feedback-Type abuse) -> complaint
    "unsubscribe <token>" (the mailto: of List-Unsubscribe), the token verified -> unsubscribe
    anything else, or a token that does not verify -> left in the folder and counted

Whose message it is: the VERP envelope sender ([send] bounce_address with {token}), which
the DSN comes back to, names the reader with a signed token and wins; then the DSN's own
Original-/Final-Recipient; then the recipient key in the returned Message-ID.

Every event goes through Store.record_event with the mail's Message-ID as its id, and a
handled mail is then moved to [inbox] processed_folder: a run that stops between the two
applies nothing twice the next time, it only files the mail.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import imaplib
import re
import ssl
from dataclasses import dataclass, field
from email.message import Message as MailMessage
from email.parser import HeaderParser
from email.utils import getaddresses

from .config import Config
from .errors import ConfigError, NewsletterError
from .outcome import COMPLAINT, HARD_BOUNCE, SOFT_BOUNCE, UNSUBSCRIBE, Event, bounce_kind
from .store import Store, open_store
from .tokens import TOKEN_LENGTH, Signer, TokenError

__all__ = ["InboxError", "InboxSummary", "Verdict", "classify", "read_inbox"]


class InboxError(NewsletterError):
    """The mailbox cannot be read: connection, TLS, login, folder."""


@dataclass
class Verdict:
    """What one mail is and what it says."""

    kind: str  # "bounce", "complaint", "unsubscribe" or "unknown"
    events: list[Event] = field(default_factory=list)
    not_readers: list[str] = field(default_factory=list)  # bounces that are the sender's or server's fault
    why: str = ""  # for "unknown": why it stays


@dataclass
class InboxSummary:
    folder: str
    processed_folder: str
    counts: dict[str, int] = field(default_factory=lambda: {
        HARD_BOUNCE: 0, SOFT_BOUNCE: 0, COMPLAINT: 0, UNSUBSCRIBE: 0})
    not_readers: list[str] = field(default_factory=list)
    replays: int = 0  # events applied by an earlier run that did not get to file their mail
    unknown: list[str] = field(default_factory=list)  # why each mail left in the folder stays
    filed: int = 0


# -- classifying one mail ----------------------------------------------------------------------

_UNSUBSCRIBE_SUBJECT = re.compile(r"^\s*unsubscribe\s+(\S+)\s*$", re.I)
# message.py's Message-ID: <{issue}.{digest:10}[.test].{rkey}@{domain}>
_OUR_MESSAGE_ID = re.compile(r"<?(?P<issue>[^<>@\s]+)\.[0-9a-f]{10}(?P<test>\.test)?\.(?P<rkey>[A-Za-z0-9_-]{22})@")
_REPLY = re.compile(r"\b([45][0-9][0-9])[ -]+((?:[45]\.[0-9]{1,3}\.[0-9]{1,3}\b)?[^\r\n]*)")
_AUTOMATIC_FROM = re.compile(r"mailer-daemon|postmaster", re.I)


class _Reader:
    """Looks up who a mail is about; made once a run."""

    def __init__(self, signer: Signer, store: Store, bounce_address: str | None):
        self.signer, self.store = signer, store
        self.verp = None
        if bounce_address and "{token}" in bounce_address:
            local, _, domain = bounce_address.rpartition("@")
            before, _, after = local.partition("{token}")
            self.verp = re.compile(re.escape(before) + f"([A-Za-z0-9_-]{{{TOKEN_LENGTH}}})" + re.escape(after)
                                   + "@" + re.escape(domain) + r"\Z", re.I)

    def email_for_token(self, token: str) -> str | None:
        try:
            return self.store.email_for_key(self.signer.verify(token))
        except TokenError:
            return None

    def verp_addresses(self, values: list[str]) -> list[str] | None:
        """The readers named by VERP addresses among `values`; None if there is none, and
        [] if one is there but its token does not verify (a forgery: the mail stays)."""
        if not self.verp:
            return None
        tokens = [m.group(1) for _, address in getaddresses(values) if (m := self.verp.match(address.strip()))]
        if not tokens:
            return None
        found = {self.email_for_token(t) for t in tokens}
        return [] if None in found else sorted(found)


def _header_values(msg: MailMessage, *names: str) -> list[str]:
    return [str(v) for name in names for v in (msg.get_all(name) or [])]


def _returned_headers(msg: MailMessage) -> MailMessage | None:
    """The headers of our message that came back inside a report (message/rfc822 or
    text/rfc822-headers), if any."""
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            inner = part.get_payload()
            return inner[0] if isinstance(inner, list) and inner else None
        if ctype == "text/rfc822-headers":
            return HeaderParser(policy=email.policy.default).parsestr(part.get_content())
    return None


def _about(returned: MailMessage | None, reader: _Reader) -> tuple[str | None, str | None]:
    """(issue, reader's address) from the returned Message-ID: test sends name no issue."""
    if returned is None:
        return None, None
    found = _OUR_MESSAGE_ID.match(str(returned.get("Message-ID", "")).strip())
    if not found:
        return None, None
    return (None if found["test"] else found["issue"]), reader.store.email_for_key(found["rkey"])


def _fields(part: MailMessage) -> list[MailMessage]:
    """The header blocks of a message/delivery-status or message/feedback-report part."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return payload
    return [HeaderParser(policy=email.policy.default).parsestr(block)
            for block in re.split(r"\r?\n\r?\n", str(payload)) if block.strip()]


def _address_field(value) -> str | None:
    """`rfc822; someone@example.com` -> the address."""
    if not value:
        return None
    address = str(value).split(";", 1)[-1].strip().strip("<>").strip()
    return address.lower() if "@" in address else None


def _mail_id(msg: MailMessage, data: bytes) -> str:
    message_id = str(msg.get("Message-ID", "")).strip()
    return message_id or "sha256:" + hashlib.sha256(data).hexdigest()


def classify(data: bytes, reader: _Reader) -> Verdict:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    mail_id = _mail_id(msg, data)
    report = msg.get_param("report-type", "", header="content-type") if msg.get_content_type() == \
        "multipart/report" else ""
    report = str(report).lower()
    if report == "delivery-status":
        return _dsn(msg, mail_id, reader)
    if report == "feedback-report":
        return _arf(msg, mail_id, reader)
    subject = _UNSUBSCRIBE_SUBJECT.match(str(msg.get("Subject", "")))
    if subject:
        address = reader.email_for_token(subject.group(1))
        if not address:
            return Verdict("unknown", why=f"{mail_id}: an unsubscribe request whose token does not verify "
                                          "or names nobody we sent to")
        return Verdict("unsubscribe", [Event(UNSUBSCRIBE, address, "mailto", "unsubscribe mail", mail_id)])
    if _AUTOMATIC_FROM.search(str(msg.get("From", ""))) or str(msg.get("Return-Path", "")).strip() == "<>":
        return _other_bounce(msg, mail_id, reader)
    return Verdict("unknown", why=f"{mail_id}: not a bounce, complaint or unsubscribe "
                                  f"(subject {str(msg.get('Subject', ''))[:80]!r})")


def _bounce_events(verdicts: list[tuple[str, str | None, str]], mail_id: str, verp: list[str] | None,
                   issue: str | None, fallback: str | None) -> Verdict:
    """`verdicts`: (HARD_BOUNCE/SOFT_BOUNCE/None, the address the report names, its words)."""
    events, not_readers = [], []
    for n, (kind, named, words) in enumerate(verdicts):
        address = verp[0] if verp else (named or fallback)
        if kind is None:
            not_readers.append(f"{address or 'unknown recipient'}: {words}")
            continue
        if not address:
            continue
        event_id = mail_id if len(verdicts) == 1 else f"{mail_id} #{n}"
        events.append(Event(kind, address, "dsn", words, event_id, issue))
    if not events and not not_readers:
        return Verdict("unknown", why=f"{mail_id}: a bounce that names no reader of ours")
    return Verdict("bounce", events, not_readers)


def _dsn(msg: MailMessage, mail_id: str, reader: _Reader) -> Verdict:
    verp = reader.verp_addresses(_header_values(msg, "To", "Delivered-To", "X-Original-To"))
    if verp == []:
        return Verdict("unknown", why=f"{mail_id}: a bounce to a VERP address whose token does not verify")
    issue, by_message_id = _about(_returned_headers(msg), reader)
    status_part = next((p for p in msg.walk() if p.get_content_type() == "message/delivery-status"), None)
    blocks = _fields(status_part)[1:] if status_part is not None else []
    verdicts = []
    for block in blocks:
        action = str(block.get("Action", "")).strip().lower()
        if action not in ("failed", "delayed"):
            continue  # delivered, relayed, expanded: nothing went wrong
        status, diagnostic = str(block.get("Status", "")), str(block.get("Diagnostic-Code", ""))
        named = _address_field(block.get("Original-Recipient")) or _address_field(block.get("Final-Recipient"))
        words = " ".join(f"{status.strip()} {diagnostic.strip()}".split())
        verdicts.append((bounce_kind(status, diagnostic, action == "delayed"), named, words))
    return _bounce_events(verdicts, mail_id, verp, issue, by_message_id)


def _other_bounce(msg: MailMessage, mail_id: str, reader: _Reader) -> Verdict:
    from flufl.bounce import all_failures

    temporary, permanent = all_failures(msg)
    if not temporary and not permanent:
        return Verdict("unknown", why=f"{mail_id}: an automatic mail with no failed address in it")
    verp = reader.verp_addresses(_header_values(msg, "To", "Delivered-To", "X-Original-To"))
    if verp == []:
        return Verdict("unknown", why=f"{mail_id}: a bounce to a VERP address whose token does not verify")
    issue, by_message_id = _about(_returned_headers(msg), reader)
    body = msg.get_body(("plain",))
    text = body.get_content() if body is not None else ""
    reply = _REPLY.search(text)
    # the server's reply, when the text quotes one; else its words alone (as an old server's 550)
    words = " ".join(f"{reply.group(1)} {reply.group(2)}".split()) if reply else " ".join(text.split())[:300]
    verdict = bounce_kind(reply.group(2) if reply else "", f"{reply.group(1)} {reply.group(2)}" if reply
                              else f"550 {words}")
    verdicts = [(SOFT_BOUNCE, a.decode("utf-8", "replace").lower(), words) for a in sorted(temporary)]
    verdicts += [(verdict, a.decode("utf-8", "replace").lower(), words) for a in sorted(permanent)]
    return _bounce_events(verdicts, mail_id, verp, issue, by_message_id)


def _tokens_in(text: str) -> list[str]:
    """Candidate tokens: the last TOKEN_LENGTH characters of each long base64url run
    ("...unsubscribe%20TOKEN" runs the "20" into it)."""
    return [run[-TOKEN_LENGTH:] for run in re.findall(r"[A-Za-z0-9_-]{%d,}" % TOKEN_LENGTH, text)]


def _arf(msg: MailMessage, mail_id: str, reader: _Reader) -> Verdict:
    part = next((p for p in msg.walk() if p.get_content_type() == "message/feedback-report"), None)
    report = _fields(part)[0] if part is not None and _fields(part) else None
    if report is None or str(report.get("Feedback-Type", "")).strip().lower() != "abuse":
        return Verdict("unknown", why=f"{mail_id}: a feedback report that is not a complaint (abuse)")
    verp = reader.verp_addresses(_header_values(report, "Original-Mail-From"))
    if verp == []:
        return Verdict("unknown", why=f"{mail_id}: a complaint naming a VERP address whose token does not verify")
    returned = _returned_headers(msg)
    issue, by_message_id = _about(returned, reader)
    address = verp[0] if verp else None
    if not address and returned is not None:  # our List-Unsubscribe carries the reader's signed token
        address = next(filter(None, map(reader.email_for_token, _tokens_in(str(returned.get("List-Unsubscribe", ""))))),
                       None)
    address = address or by_message_id or _address_field(report.get("Original-Rcpt-To"))
    if not address and returned is not None:
        address = next((a.lower() for _, a in getaddresses(_header_values(returned, "To")) if "@" in a), None)
    if not address:
        return Verdict("unknown", why=f"{mail_id}: a complaint that names no reader of ours")
    return Verdict("complaint", [Event(COMPLAINT, address, "arf", "complaint (ARF abuse report)", mail_id, issue)])


# -- the mailbox -------------------------------------------------------------------------------

def _quote(folder: str) -> str:
    return f'"{folder}"'  # config.MailboxName allows no quote or backslash in it


def _check(answer, what: str) -> list:
    typ, data = answer
    if typ != "OK":
        detail = b" ".join(d for d in data if isinstance(d, bytes)).decode("utf-8", "replace")
        raise InboxError(f"{what}: the server said {typ} {detail}".rstrip())
    return data


def _connect(config: Config) -> imaplib.IMAP4:
    settings = config.inbox
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    if settings.security == "ssl":
        imap = imaplib.IMAP4_SSL(settings.host, settings.port, ssl_context=context, timeout=settings.timeout)
    else:
        imap = imaplib.IMAP4(settings.host, settings.port, timeout=settings.timeout)
        try:
            imap.starttls(ssl_context=context)
        except BaseException:
            try:
                imap.shutdown()
            except OSError:
                pass  # a failed handshake may have closed the socket already: the handshake's error counts
            raise
    return imap


def read_inbox(config: Config) -> InboxSummary:
    """Classify every mail in [inbox] folder, apply what it says, file what was handled."""
    settings = config.inbox
    missing = [f"{config.path}: inbox.{key}: required for `newsletter inbox` ({why})" for key, value, why in (
        ("host", settings.host, "the IMAP server"), ("username", settings.username, "the mailbox's login"),
        ("password", settings.password, "set NEWSLETTER_INBOX_PASSWORD"),
        ("secret", config.send.secret, "set NEWSLETTER_SECRET, the one the messages were sent with: "
                                       "it verifies unsubscribe and VERP tokens"),
    ) if not value]
    if settings.processed_folder == settings.folder:
        missing.append(f"{config.path}: inbox.processed_folder: must differ from inbox.folder ({settings.folder!r})")
    if missing:
        raise ConfigError([m.replace("inbox.secret", "send.secret") for m in missing])
    signer = Signer(config.send.secret.encode("utf-8"), config.publication.list_id)
    where = f"{settings.host}:{settings.port}"
    summary = InboxSummary(settings.folder, settings.processed_folder)
    try:
        imap = _connect(config)
    except ssl.SSLCertVerificationError as exc:
        raise InboxError(f"{where}: the server's TLS certificate is not trusted ({exc.verify_message}); nothing "
                         "was read. If the server uses a private CA, set inbox.ca_file to its certificate") from exc
    except (OSError, imaplib.IMAP4.error) as exc:
        raise InboxError(f"{where}: cannot connect over {settings.security}: {exc}") from exc
    try:
        with open_store(config.store) as store:
            _run(imap, _Reader(signer, store, config.send.bounce_address), settings, summary)
    except (OSError, imaplib.IMAP4.error) as exc:  # the password is never part of these
        raise InboxError(f"{where}: {exc}") from exc
    finally:
        try:
            imap.logout()
        except (OSError, imaplib.IMAP4.error):
            pass
    return summary


def _run(imap: imaplib.IMAP4, reader: _Reader, settings, summary: InboxSummary) -> None:
    try:
        imap.login(settings.username, settings.password)
    except imaplib.IMAP4.error as exc:
        raise InboxError(f"login as {settings.username!r} refused: {exc}") from None
    capabilities = set(_check(imap.capability(), "CAPABILITY")[0].upper().split())
    _check(imap.select(_quote(settings.folder)), f"folder {settings.folder!r}")
    uids = _check(imap.uid("SEARCH", None, "ALL"), "SEARCH")[0].split()
    handled = []
    for uid in uids:
        data = _check(imap.uid("FETCH", uid, "(BODY.PEEK[])"), "FETCH")  # PEEK: what stays stays unread
        raw = next((item[1] for item in data if isinstance(item, tuple)), None)
        if raw is None:
            continue  # expunged by someone else meanwhile
        try:
            verdict = classify(raw, reader)
        except Exception as exc:  # noqa: BLE001 - anyone can mail this folder: one unreadable mail
            # (a header the stdlib's parser trips over) must not stop every run for good
            verdict = Verdict("unknown", why=f"UID {uid.decode('ascii', 'replace')}: a mail that could not be "
                                             f"read ({type(exc).__name__})")
        if verdict.kind == "unknown":
            summary.unknown.append(verdict.why)
            continue
        for event in verdict.events:
            if _seen(reader.store, event):
                summary.replays += 1
            else:
                reader.store.record_event(event)
                summary.counts[event.kind] += 1
        summary.not_readers += verdict.not_readers
        handled.append(uid)
    if handled:
        _file(imap, handled, settings.processed_folder, capabilities)
        summary.filed = len(handled)


def _seen(store: Store, event: Event) -> bool:
    """Applied by an earlier run (record_event's False also means "changed nothing", as a
    soft bounce does): a run that stopped before filing its mail."""
    return store.has_event(event.source, event.event_id)


def _file(imap: imaplib.IMAP4, uids: list[bytes], folder: str, capabilities: set[str]) -> None:
    """Move the handled mail to `folder` (made if missing): MOVE (RFC 6851) where the
    server has it, else COPY, \\Deleted and an expunge of exactly those (UIDPLUS) or all."""
    if not _check(imap.list('""', _quote(folder)), "LIST")[0]:
        _check(imap.create(_quote(folder)), f"creating folder {folder!r}")
    uid_set = b",".join(uids).decode("ascii")
    if "MOVE" in capabilities:
        _check(imap.uid("MOVE", uid_set, _quote(folder)), f"moving mail to {folder!r}")
        return
    _check(imap.uid("COPY", uid_set, _quote(folder)), f"copying mail to {folder!r}")
    _check(imap.uid("STORE", uid_set, "+FLAGS.SILENT", r"(\Deleted)"), "flagging mail deleted")
    if "UIDPLUS" in capabilities:
        _check(imap.uid("EXPUNGE", uid_set), "UID EXPUNGE")
    else:
        _check(imap.expunge(), "EXPUNGE")
