"""`newsletter inbox` against a real IMAP server (a throwaway dovecot on loopback, IMAPS and
STARTTLS): the example issue is sent over SMTP (aiosmtpd) with VERP, and what comes back
(DSNs, an ARF complaint, unsubscribe mails) is put in the mailbox by IMAP APPEND."""

import email
import email.policy
import shutil
from dataclasses import dataclass

import pytest

from conftest import EXAMPLE, addresses, config_for, require, run_cli, store_of, subscribe
from newsletter.sender import send_issue
from newsletter.tokens import Signer
from smtp_server import Handler, Server, make_certificate

ISSUE = EXAMPLE.stem
BOUNCES = "bounces+{token}@watchman.example"
MAILBOX = "bounces@watchman.example"  # where the DSNs arrive: the VERP addresses are delivered there

pytestmark = pytest.mark.usefixtures("store_backend")  # each test on SQLite and on PostgreSQL


@pytest.fixture(scope="module")
def dovecot():
    require("dovecot (apt-get install dovecot-imapd)", shutil.which("dovecot") is not None)
    from imap_server import Dovecot
    server = Dovecot()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


@dataclass
class World:
    env: dict
    received: dict  # recipient -> smtp_server.Received
    dovecot: object
    config: object

    def run(self, **env):
        result = run_cli("inbox", env={**self.env, **{f"NEWSLETTER_{k.upper()}": str(v) for k, v in env.items()}})
        assert imap_password() not in result.stdout + result.stderr
        return result

    def row(self, address):
        with store_of(self.config) as store:
            db = store.db
            status = db.execute("SELECT status FROM subscribers WHERE email = ?", (address,)).fetchone()[0]
            state = db.execute("SELECT state FROM deliveries WHERE email = ? AND issue = ?",
                               (address, ISSUE)).fetchone()[0]
            suppressed = db.execute("SELECT count(*) FROM suppressions WHERE email = ?", (address,)).fetchone()[0]
        return status, state, bool(suppressed)

    def headers_of(self, address) -> str:
        data = self.received[address].data.decode("ascii")
        return data.split("\r\n\r\n", 1)[0]

    def token_of(self, address) -> str:
        message = email.message_from_bytes(self.received[address].data, policy=email.policy.default)
        return str(message["List-Unsubscribe"]).split("subject=unsubscribe%20")[1].rstrip(">")


def imap_password():
    from imap_server import PASSWORD
    return PASSWORD


READERS = addresses(6)
UNTOUCHED = ("subscribed", "sent", False)


@pytest.fixture
def world(tmp_path, cert, dovecot):
    from imap_server import USER
    dovecot.clear()
    handler = Handler()
    with Server(handler, tls=cert) as smtp:
        env = {
            "NEWSLETTER_SECRET": "test-secret-not-for-production",
            "NEWSLETTER_STORE_PATH": str(tmp_path / "store.sqlite3"),
            "NEWSLETTER_SEND_BACKEND": "smtp",
            "NEWSLETTER_SEND_BOUNCE_ADDRESS": BOUNCES,
            "NEWSLETTER_SMTP_HOST": "127.0.0.1",
            "NEWSLETTER_SMTP_PORT": str(smtp.port),
            "NEWSLETTER_SMTP_CA_FILE": str(cert[0]),
            "NEWSLETTER_SMTP_SECURITY": "starttls",
            "NEWSLETTER_SMTP_USERNAME": "sender",
            "NEWSLETTER_SMTP_PASSWORD": "correct horse battery staple",
        }
        config = config_for(env)
        subscribe(config, READERS)
        assert send_issue(EXAMPLE, config).this_run["sent"] == len(READERS)
    env.update({
        "NEWSLETTER_INBOX_HOST": "127.0.0.1",
        "NEWSLETTER_INBOX_PORT": str(dovecot.imaps_port),
        "NEWSLETTER_INBOX_USERNAME": USER,
        "NEWSLETTER_INBOX_PASSWORD": imap_password(),
        "NEWSLETTER_INBOX_CA_FILE": str(dovecot.cert),
    })
    return World(env, {r.recipient: r for r in handler.received}, dovecot, config)


def dsn(mail_id, to=MAILBOX, recipient=None, status="5.1.1", action="failed", diagnostic=None, returned=None):
    """A DSN as postfix writes one (RFC 3464), CRLF line ends."""
    block = [f"Final-Recipient: rfc822; {recipient}", f"Original-Recipient: rfc822;{recipient}"] if recipient else []
    block += [f"Action: {action}", f"Status: {status}", "Remote-MTA: dns; mx.example.com"]
    if diagnostic:
        block.append(f"Diagnostic-Code: smtp; {diagnostic}")
    lines = [
        "Return-Path: <>", f"Delivered-To: {to}",
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)", f"To: {to}",
        "Subject: Undelivered Mail Returned to Sender", f"Message-ID: <{mail_id}@mx.example.net>",
        "Date: Tue, 01 Dec 2026 10:00:00 +0000", "Auto-Submitted: auto-replied", "MIME-Version: 1.0",
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B1"', "",
        "--B1", "Content-Description: Notification", "Content-Type: text/plain; charset=us-ascii", "",
        "This is the mail system at host mx.example.net.", "I'm sorry to have to inform you that your message",
        "could not be delivered to one or more recipients.", "",
        "--B1", "Content-Description: Delivery report", "Content-Type: message/delivery-status", "",
        "Reporting-MTA: dns; mx.example.net", "Arrival-Date: Tue,  1 Dec 2026 09:59:58 +0000", "",
        *block, "",
    ]
    if returned:
        lines += ["--B1", "Content-Description: Undelivered Message Headers", "Content-Type: text/rfc822-headers",
                  "", returned.replace("\r\n", "\n").replace("\n", "\r\n"), ""]
    lines.append("--B1--")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def arf(mail_id, returned=None, original_mail_from=None):
    """A complaint as a mailbox provider's feedback loop sends one (RFC 5965), the reader's
    address redacted from the returned message as some providers do."""
    if returned:
        returned = "\r\n".join(line for line in returned.replace("\r\n", "\n").split("\n")
                             if not line.startswith("To:"))
    lines = [
        "From: feedback@fbl.example.net", f"To: {MAILBOX}", "Subject: Abuse report",
        f"Message-ID: <{mail_id}@fbl.example.net>", "Date: Tue, 01 Dec 2026 10:00:00 +0000", "MIME-Version: 1.0",
        'Content-Type: multipart/report; report-type=feedback-report; boundary="B2"', "",
        "--B2", "Content-Type: text/plain", "", "This is an email abuse report.", "",
        "--B2", "Content-Type: message/feedback-report", "",
        "Feedback-Type: abuse", "User-Agent: ExampleFBL/1.0", "Version: 1",
        *([f"Original-Mail-From: <{original_mail_from}>"] if original_mail_from else []),
        "Arrival-Date: Tue, 01 Dec 2026 09:00:00 +0000", "",
        *(["--B2", "Content-Type: text/rfc822-headers", "", returned, ""] if returned else []),
        "--B2--",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def unsubscribe_mail(mail_id, token, sender="reader@example.com"):
    return (f"From: {sender}\r\nTo: unsubscribe@watchman.example\r\nSubject: unsubscribe {token}\r\n"
            f"Message-ID: <{mail_id}@example.com>\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n\r\n\r\n").encode("ascii")


def test_hard_bounce_suppresses_and_fails_the_ledger_row(world):
    world.dovecot.append(dsn("hard1", recipient=READERS[0],
                             diagnostic=f"550 5.1.1 <{READERS[0]}>: Recipient address rejected: User unknown",
                             returned=world.headers_of(READERS[0])))
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert "1 hard bounce(s)" in result.stdout and "1 mail(s) moved" in result.stdout
    assert world.row(READERS[0]) == ("bounced", "failed", True)
    assert all(world.row(r) == UNTOUCHED for r in READERS[1:])
    assert world.dovecot.messages() == []
    assert len(world.dovecot.messages("newsletter-processed")) == 1


def test_soft_bounce_changes_nothing(world):
    world.dovecot.append(dsn("soft1", recipient=READERS[1], status="4.2.2", action="delayed",
                             diagnostic="452 4.2.2 Mailbox full", returned=world.headers_of(READERS[1])))
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert "0 hard bounce(s), 1 soft bounce(s)" in result.stdout
    assert all(world.row(r) == UNTOUCHED for r in READERS)
    assert world.dovecot.messages() == []  # handled: filed away


def test_a_bounce_that_blames_the_sender_suppresses_nobody(world):
    world.dovecot.append(dsn("sender1", recipient=READERS[2], status="5.1.8",
                             diagnostic="553 5.1.8 <brief@watchman.example>: Sender address rejected: Domain not found"))
    world.dovecot.append(dsn("relay1", recipient=READERS[3], status="5.7.1",
                             diagnostic=f"554 5.7.1 <{READERS[3]}>: Relay access denied"))
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert "0 hard bounce(s)" in result.stdout and "2 bounce(s) not the reader's fault" in result.stdout
    assert "Relay access denied" in result.stderr and "5.1.8" in result.stderr
    assert all(world.row(r) == UNTOUCHED for r in READERS)
    assert len(world.dovecot.messages("newsletter-processed")) == 2


def qmail_bounce(mail_id, recipient, said):
    """A bounce in qmail's own format, no DSN: flufl.bounce finds the address."""
    return (f"Return-Path: <>\r\nFrom: MAILER-DAEMON@mx.example.net\r\nTo: {MAILBOX}\r\nSubject: failure notice\r\n"
            f"Message-ID: <{mail_id}@mx.example.net>\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n\r\n"
            "Hi. This is the qmail-send program at mx.example.net.\r\n"
            "I'm afraid I wasn't able to deliver your message to the following addresses.\r\n"
            "This is a permanent error; I've given up. Sorry it didn't work out.\r\n\r\n"
            f"<{recipient}>:\r\n192.0.2.1 does not like recipient.\r\nRemote host said: {said}\r\n"
            "Giving up on 192.0.2.1.\r\n\r\n--- Below this line is a copy of the message.\r\n\r\n"
            "Subject: The Watchman Brief\r\n\r\nHello\r\n").encode("ascii")


def test_bounces_in_another_format_follow_the_same_rule(world):
    world.dovecot.append(qmail_bounce("q1", READERS[0], f"550 5.1.1 <{READERS[0]}>: Recipient address rejected: "
                                                        "User unknown in virtual mailbox table"))
    world.dovecot.append(qmail_bounce("q2", READERS[1], f"554 5.7.1 <{READERS[1]}>: Relay access denied"))
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert "1 hard bounce(s)" in result.stdout and "1 bounce(s) not the reader's fault" in result.stdout
    status, _, suppressed = world.row(READERS[0])
    assert (status, suppressed) == ("bounced", True)
    assert all(world.row(r) == UNTOUCHED for r in READERS[1:])
    assert world.dovecot.messages() == []


def test_a_complaint_suppresses_the_reader(world):
    world.dovecot.append(arf("fbl1", world.headers_of(READERS[2])))
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert "1 complaint(s)" in result.stdout
    assert world.row(READERS[2]) == ("complained", "sent", True)  # it arrived; they do not want it
    assert all(world.row(r) == UNTOUCHED for r in READERS if r != READERS[2])


def test_a_complaint_found_by_its_verp_address_alone(world):
    world.dovecot.append(arf("fbl2", original_mail_from=world.received[READERS[5]].mail_from))
    forged = world.received[READERS[4]].mail_from[:-len("@watchman.example") - 4] + "AAAA@watchman.example"
    world.dovecot.append(arf("fbl3", original_mail_from=forged))
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert "1 complaint(s)" in result.stdout and "1 left in INBOX" in result.stdout
    assert world.row(READERS[5]) == ("complained", "sent", True)
    assert all(world.row(r) == UNTOUCHED for r in READERS[:5])


def test_unsubscribe_mail_with_a_valid_token_and_a_forged_one(world):
    world.dovecot.append(unsubscribe_mail("unsub1", world.token_of(READERS[3])))
    config = world.config
    rkey = Signer(b"test-secret-not-for-production", config.publication.list_id).recipient_key(READERS[4])
    forged = Signer(b"someone else's secret", config.publication.list_id).token(rkey)
    world.dovecot.append(unsubscribe_mail("forged1", forged))
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert "1 unsubscribe(s)" in result.stdout and "1 left in INBOX" in result.stdout
    assert "token does not verify" in result.stderr
    assert world.row(READERS[3]) == ("unsubscribed", "sent", False)
    assert world.row(READERS[4]) == UNTOUCHED
    [left] = world.dovecot.messages()
    assert b"forged1" in left
    assert len(world.dovecot.messages("newsletter-processed")) == 1


def test_verp_names_the_reader_when_the_dsn_does_not(world):
    verp = world.received[READERS[4]].mail_from
    assert verp.startswith("bounces+") and verp.endswith("@watchman.example")
    assert verp == f"bounces+{world.token_of(READERS[4])}@watchman.example"
    assert len({r.mail_from for r in world.received.values()}) == len(READERS)  # one per reader
    # a DSN with no recipient fields and no returned message: only its To: (the VERP address) says who
    world.dovecot.append(dsn("verp1", to=verp, recipient=None,
                             diagnostic="550 5.1.1 The email account that you tried to reach does not exist"))
    # the same with a token that does not verify: a forgery, left alone
    bad = verp[:8] + "A" * 10 + verp[18:]
    world.dovecot.append(dsn("verp2", to=bad, recipient=None, diagnostic="550 5.1.1 no such user"))
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert "1 hard bounce(s)" in result.stdout and "1 left in INBOX" in result.stdout
    status, _, suppressed = world.row(READERS[4])
    assert (status, suppressed) == ("bounced", True)
    assert all(world.row(r) == UNTOUCHED for r in READERS if r != READERS[4])


def test_without_bounce_address_the_envelope_sender_is_the_from_address(tmp_path, cert):
    handler = Handler()
    with Server(handler, tls=cert) as smtp:
        env = {"NEWSLETTER_SECRET": "s", "NEWSLETTER_STORE_PATH": str(tmp_path / "s.sqlite3"),
               "NEWSLETTER_SEND_BACKEND": "smtp", "NEWSLETTER_SMTP_HOST": "127.0.0.1",
               "NEWSLETTER_SMTP_PORT": str(smtp.port), "NEWSLETTER_SMTP_CA_FILE": str(cert[0]),
               "NEWSLETTER_SMTP_USERNAME": "sender", "NEWSLETTER_SMTP_PASSWORD": "correct horse battery staple"}
        config = config_for(env)
        subscribe(config, addresses(2))
        send_issue(EXAMPLE, config)
    assert [r.mail_from for r in handler.received] == ["brief@watchman.example"] * 2


def test_a_second_run_does_nothing_twice(world):
    hard = dsn("again1", recipient=READERS[0], diagnostic="550 5.1.1 User unknown",
               returned=world.headers_of(READERS[0]))
    world.dovecot.append(hard)
    world.dovecot.append(unsubscribe_mail("again2", world.token_of(READERS[1])))
    world.dovecot.append(b"From: a.reader@example.com\r\nTo: bounces@watchman.example\r\nSubject: thanks!\r\n"
                         b"Message-ID: <human1@example.com>\r\n\r\nLoved the last issue.\r\n")
    first = world.run()
    assert first.returncode == 0, first.stderr
    assert "1 hard bounce(s)" in first.stdout and "1 unsubscribe(s)" in first.stdout
    assert "2 mail(s) moved" in first.stdout and "1 left in INBOX" in first.stdout
    after_first = [world.row(r) for r in READERS]
    # A run that stopped after applying but before filing: the same mail is back in the folder.
    world.dovecot.append(hard)
    second = world.run()
    assert second.returncode == 0, second.stderr
    assert "0 hard bounce(s)" in second.stdout and "0 unsubscribe(s)" in second.stdout
    assert "1 applied before" in second.stdout and "1 mail(s) moved" in second.stdout
    assert [world.row(r) for r in READERS] == after_first
    processed = world.dovecot.messages("newsletter-processed")
    assert len(processed) == 3 and [m for m in world.dovecot.messages() if b"human1" in m]
    third = world.run()
    assert "0 mail(s) moved" in third.stdout and "1 left in INBOX" in third.stdout


def test_starttls_on_the_plain_port(world):
    world.dovecot.append(unsubscribe_mail("tls1", world.token_of(READERS[5])))
    result = world.run(inbox_security="starttls", inbox_port=world.dovecot.imap_port)
    assert result.returncode == 0, result.stderr
    assert world.row(READERS[5]) == ("unsubscribed", "sent", False)


@pytest.mark.parametrize("security", ["ssl", "starttls"])
def test_an_untrusted_certificate_stops_before_anything_is_read(world, security):
    world.dovecot.append(unsubscribe_mail("untrusted1", world.token_of(READERS[5])))
    env = {k: v for k, v in world.env.items() if k != "NEWSLETTER_INBOX_CA_FILE"}
    if security == "starttls":
        env.update(NEWSLETTER_INBOX_SECURITY="starttls", NEWSLETTER_INBOX_PORT=str(world.dovecot.imap_port))
    result = run_cli("inbox", env=env)
    assert result.returncode == 2
    assert "certificate is not trusted" in result.stderr and "inbox.ca_file" in result.stderr
    assert imap_password() not in result.stdout + result.stderr
    assert world.row(READERS[5]) == UNTOUCHED
    assert len(world.dovecot.messages()) == 1


def test_a_wrong_password_is_reported_without_any_password(world):
    world.dovecot.append(unsubscribe_mail("pw1", world.token_of(READERS[5])))
    result = world.run(inbox_password="not the password 3e1d")
    assert result.returncode == 2
    assert "login as 'bounces' refused" in result.stderr
    assert "not the password 3e1d" not in result.stdout + result.stderr
    assert world.row(READERS[5]) == UNTOUCHED and len(world.dovecot.messages()) == 1


def test_missing_settings_are_named(world):
    env = {k: v for k, v in world.env.items() if k not in ("NEWSLETTER_INBOX_PASSWORD", "NEWSLETTER_INBOX_HOST")}
    result = run_cli("inbox", env=env)
    assert result.returncode == 2
    assert "inbox.host" in result.stderr and "NEWSLETTER_INBOX_PASSWORD" in result.stderr


@pytest.mark.parametrize("value, words", [
    ("bounces+{token}@{token}.example", "may appear once"),
    ("a-very-long-prefix-here+{token}@watchman.example", "over 64 characters"),
    ("bounces+{token}", "expected an address"),
])
def test_a_bad_bounce_address_is_refused_by_key(value, words):
    from newsletter.errors import ConfigError
    with pytest.raises(ConfigError) as caught:
        config_for({"NEWSLETTER_SEND_BOUNCE_ADDRESS": value})
    assert "NEWSLETTER_SEND_BOUNCE_ADDRESS" in str(caught.value) and words in str(caught.value)


def test_the_processed_folder_must_differ(world):
    result = world.run(inbox_processed_folder="INBOX")
    assert result.returncode == 2 and "inbox.processed_folder: must differ" in result.stderr


@pytest.mark.parametrize("capabilities", [{"UIDPLUS"}, set()], ids=["copy-uid-expunge", "copy-expunge"])
def test_filing_without_move(dovecot, capabilities):
    """Servers without MOVE (RFC 6851): COPY, \\Deleted, and an expunge of exactly those where
    UIDPLUS allows."""
    from newsletter.inbox import _file
    dovecot.clear(folders=("filed-here",))
    for n in range(3):
        dovecot.append(unsubscribe_mail(f"file{n}", "x"))
    with dovecot.connect() as imap:
        imap.select("INBOX")
        uids = imap.uid("SEARCH", None, "ALL")[1][0].split()
        _file(imap, uids[:2], "filed-here", capabilities)
    assert [b"file2" in m for m in dovecot.messages()] == [True]
    assert sorted(m.split(b"Message-ID: <")[1][:5] for m in dovecot.messages("filed-here")) == [b"file0", b"file1"]


def test_a_mail_the_parser_cannot_read_stays_and_the_rest_is_handled(world):
    # Anyone can mail the bounce address: a header that makes the stdlib's parser raise
    # (here an unclosed domain literal in From) must not stop every run of `inbox` for good.
    world.dovecot.append(b"From: a@[\r\nTo: " + MAILBOX.encode() + b"\r\nSubject: hello\r\n"
                         b"Message-ID: <broken1@example.net>\r\n\r\nhello\r\n")
    world.dovecot.append(dsn("hard9", recipient=READERS[0],
                             diagnostic=f"550 5.1.1 <{READERS[0]}>: Recipient address rejected: User unknown",
                             returned=world.headers_of(READERS[0])))
    result = world.run()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "1 hard bounce(s)" in result.stdout and "1 left in INBOX" in result.stdout
    assert world.row(READERS[0]) == ("bounced", "failed", True)
    [left] = world.dovecot.messages()
    assert b"broken1" in left
