"""The outcome policy as a table: what each reply means, whose fault it is, what it does."""

import pytest

from newsletter.outcome import (DATA, DEFERRED, EHLO, FAILED, GREETING, MAIL, MESSAGE, PENDING, RCPT, RECIPIENT,
                                SENDER, SENT, SERVER, UNCERTAIN, Breaker, Outcome, decide, smtp_outcome, uncertain)

CASES = [
    # stage, code, text, state, fault, suppress
    (DATA, 250, "2.0.0 Ok: queued as 1", SENT, None, False),
    (RCPT, 550, "5.1.1 <a@example.com>: Recipient address rejected: User unknown", FAILED, RECIPIENT, True),
    (RCPT, 550, "5.1.2 Bad destination system address", FAILED, RECIPIENT, True),
    (RCPT, 556, "5.1.10 Recipient address has null MX", FAILED, RECIPIENT, True),
    (RCPT, 550, "5.2.1 Mailbox disabled", FAILED, RECIPIENT, True),
    (RCPT, 552, "5.2.2 Mailbox full", FAILED, RECIPIENT, False),
    (RCPT, 452, "4.2.2 Mailbox full", DEFERRED, RECIPIENT, False),
    (RCPT, 550, "No such user here", FAILED, RECIPIENT, True),  # no enhanced code, but says so
    (RCPT, 550, "Requested action not taken", FAILED, SERVER, False),  # names no one: never suppresses
    (RCPT, 550, "5.7.1 Recipient address rejected: Access denied", FAILED, SERVER, False),
    (RCPT, 553, "5.1.8 <b@x.example>: Sender address rejected: Domain not found", FAILED, SENDER, False),
    (RCPT, 450, "4.1.8 <b@x.example>: Sender address rejected: Domain not found", DEFERRED, SENDER, False),
    (RCPT, 553, "5.1.7 Bad sender's mailbox address syntax", FAILED, SENDER, False),
    (RCPT, 554, "5.7.1 <a@example.com>: Relay access denied", FAILED, SENDER, False),
    (RCPT, 554, "5.7.1 Service unavailable; Client host [1.2.3.4] blocked using zen.spamhaus.org", FAILED,
     SENDER, False),
    (RCPT, 530, "5.7.0 Authentication required", FAILED, SENDER, False),
    (RCPT, 451, "4.3.0 Try again later", DEFERRED, SERVER, False),
    (MAIL, 550, "5.1.1 whatever the code says", FAILED, SENDER, False),  # a refusal at MAIL FROM is ours
    (MAIL, 421, "4.7.0 Too many connections", DEFERRED, SERVER, False),
    (MAIL, 535, "5.7.8 Authentication credentials invalid", FAILED, SENDER, False),
    (DATA, 554, "5.7.1 Message rejected as spam", FAILED, MESSAGE, False),
    (DATA, 550, "5.6.0 Message content rejected", FAILED, MESSAGE, False),
    (DATA, 552, "5.3.4 Message too big", FAILED, MESSAGE, False),
    (DATA, 550, "5.7.26 Unauthenticated email from example.com is not accepted due to DMARC", FAILED, SENDER,
     False),
    (DATA, 451, "4.7.1 Greylisted, try later", DEFERRED, SERVER, False),
    (GREETING, 554, "5.7.1 Client host blocked", FAILED, SENDER, False),
    (EHLO, 504, "5.5.2 Helo command rejected: need fully-qualified hostname", FAILED, SENDER, False),
]


@pytest.mark.parametrize("stage, code, text, state, fault, suppress", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2][:24]}" for c in CASES])
def test_what_an_smtp_reply_means(stage, code, text, state, fault, suppress):
    outcome = smtp_outcome(code, text, stage)
    assert (outcome.state, outcome.fault, outcome.suppress) == (state, fault, suppress)
    assert outcome.reply == f"{code} {text}"
    assert outcome.stops_run == (state != SENT and fault in (SENDER, MESSAGE))


def test_decide_stops_the_run_and_puts_the_row_back_for_the_sender_and_the_message():
    for reply, fault, says in [((553, "5.1.8 Sender address rejected: Domain not found"), SENDER, "[sender] address"),
                               ((554, "5.7.1 Message rejected as spam"), MESSAGE, "the message itself")]:
        outcome = smtp_outcome(*reply, DATA if fault == MESSAGE else RCPT)
        decision = decide(outcome, attempts=1, max_attempts=5, retry_delay=60, now=1000.0)
        assert decision.state == PENDING and not decision.suppress
        assert says in decision.stop and reply[1] in decision.stop


def test_decide_backs_off_deferred_rows_and_gives_up_after_max_attempts():
    outcome = smtp_outcome(451, "4.3.0 Later", RCPT)
    first = decide(outcome, attempts=1, max_attempts=3, retry_delay=60, now=1000.0)
    third = decide(outcome, attempts=2, max_attempts=3, retry_delay=60, now=1000.0)
    assert (first.state, first.next_try) == (DEFERRED, 1060.0) and third.next_try == 1120.0
    assert decide(Outcome(DEFERRED, "429", SERVER, retry_after=500.0), 1, 3, 60, 1000.0).next_try == 1500.0
    last = decide(outcome, attempts=3, max_attempts=3, retry_delay=60, now=1000.0)
    assert last.state == FAILED and "gave up after 3 attempts" in last.reply and not last.suppress


def test_uncertain_is_never_retried_by_decide():
    decision = decide(uncertain("no answer within 30 s"), 1, 5, 60, 1000.0)
    assert decision.state == UNCERTAIN and decision.next_try == 0 and not decision.stop


def test_the_breaker_trips_on_the_same_refusal_in_a_row_only():
    def refused():  # each recipient's own answer
        return smtp_outcome(550, "5.1.1 User unknown", RCPT)

    other = smtp_outcome(550, "5.2.1 Mailbox disabled", RCPT)
    sent = smtp_outcome(250, "Ok", DATA)
    breaker = Breaker(3)
    assert breaker.observe([refused()]) is None and breaker.observe([refused()]) is None
    assert breaker.observe([sent]) is None  # a success in between starts the count again
    assert breaker.observe([refused(), refused()]) is None and breaker.observe([other]) is None
    assert breaker.observe([refused(), refused()]) is None
    assert "3 recipients (or requests) in a row" in breaker.observe([refused()])
    # One answer to a whole API request counts once, however many messages it held.
    whole = uncertain("API response 503")
    assert Breaker(2).observe([whole] * 1000) is None
    assert Breaker(0).observe([refused() for _ in range(50)]) is None  # 0: off


def test_giving_up_on_what_may_have_gone_out_leaves_it_uncertain_not_failed():
    """A Resend timeout is retried under its idempotency key, but the key lasts a day: once
    the attempts run out, --retry-failed must not resend it blindly later."""
    lost = Outcome(DEFERRED, "Resend: no answer within 30 s", SERVER, code="Resend timeout", may_have_gone=True)
    assert decide(lost, 2, 3, 60, 1000.0).state == DEFERRED
    last = decide(lost, 3, 3, 60, 1000.0)
    assert last.state == UNCERTAIN and "may have been delivered" in last.reply


def test_a_retry_after_that_never_ends_is_not_taken():
    import httpx

    from newsletter.backends.http import HttpBackend

    for value, expected in [("120", 120.0), ("inf", None), ("nan", None), ("-5", 0.0), ("soon", None)]:
        response = httpx.Response(429, headers={"retry-after": value})
        assert HttpBackend.retry_after(None, response) == expected, value


def test_a_provider_naming_an_address_names_that_address_only():
    from types import SimpleNamespace

    from newsletter.backends.http import HttpBackend

    batch = [SimpleNamespace(recipient="s@x.com"), SimpleNamespace(recipient="news@x.com")]
    assert HttpBackend.named_recipient("invalid address: news@x.com", batch) == 1
    assert HttpBackend.named_recipient("<S@X.com> does not exist", batch) == 0
    assert HttpBackend.named_recipient("invalid address: ss@x.com", batch) is None
    assert HttpBackend.named_recipient("Found inactive addresses: news@x.com.\nInactive ...", batch) == 1
    assert HttpBackend.named_recipient("no such address: news@x.com.au", batch) is None
