"""Real postfix `smtpd` on loopback as the oracle for the SMTP client (tests/postfix.py): a
send through it with STARTTLS reaches everyone once, and its refusal of our sender at RCPT
("553 5.1.8 ... Sender address rejected: Domain not found") stops the run without bouncing,
suppressing or failing a single reader. One postfix for the whole module."""

import pytest

from conftest import EXAMPLE, addresses, config_for, require, run_cli, subscribe
from newsletter.store import Store
from postfix import REFUSED_SENDER, Postfix, installed
from smtp_server import make_certificate
from test_send import settings_env

ALLOWED_SENDER = "news@postfix.test"


@pytest.fixture(scope="module")
def mta(tmp_path_factory):
    require("postfix (Debian's package, run as root)", installed())
    cert = make_certificate(tmp_path_factory.mktemp("postfix-tls"))
    with Postfix(cert) as mta:
        yield mta


def postfix_env(tmp_path, mta, sender, **extra):
    env = settings_env(tmp_path, mta.port, mta.cert, sender_address=sender, **extra)
    del env["NEWSLETTER_SMTP_USERNAME"], env["NEWSLETTER_SMTP_PASSWORD"]  # postfix trusts loopback: no login
    return env


def rows(config):
    with Store(config.store.path) as store:
        deliveries = {e: (s, f) for e, s, f in store.db.execute("SELECT email, state, fault FROM deliveries")}
        statuses = dict(store.db.execute("SELECT email, status FROM subscribers"))
        suppressed = [e for (e,) in store.db.execute("SELECT email FROM suppressions")]
    return deliveries, statuses, suppressed


def test_a_send_through_postfix_with_starttls_reaches_everyone_once(tmp_path, mta):
    env = postfix_env(tmp_path, mta, ALLOWED_SENDER, smtp_connections=3, smtp_messages_per_connection=4)
    everyone = addresses(25, prefix="e2e")
    subscribe(config_for(env), everyone)
    result = run_cli("send", EXAMPLE, env=env)
    assert result.returncode == 0, result.stderr
    assert "sent 25, deferred 0, failed 0" in result.stdout
    mta.wait_delivered_to(everyone)
    delivered = mta.sink.delivered()
    assert {a: delivered[a] for a in everyone} == {a: 1 for a in everyone}
    deliveries, _, _ = rows(config_for(env))
    assert {s for s, _ in deliveries.values()} == {"sent"}
    for received in mta.sink.received:  # postfix's own Received header says the client used STARTTLS
        if received.recipient in everyone:
            head = received.data.split(b"\r\n\r\n", 1)[0]
            assert b"(using TLSv1" in head, head[:400]


def test_postfix_refusing_the_sender_stops_the_run_and_nobody_is_bounced(tmp_path, mta):
    # The headline: postfix refuses our sender domain at RCPT. It is our fault, not the
    # readers': the run stops at once, everyone stays pending, nobody is bounced or suppressed.
    env = postfix_env(tmp_path, mta, REFUSED_SENDER, smtp_connections=2)
    everyone = addresses(12, prefix="refused")
    subscribe(config_for(env), everyone)
    result = run_cli("send", EXAMPLE, env=env)
    assert result.returncode == 2, result.stderr
    assert "553 5.1.8 <brief@watchman.example>: Sender address rejected: Domain not found" in result.stderr
    assert "check [sender] address" in result.stderr and "Nobody has been marked failed" in result.stderr
    deliveries, statuses, suppressed = rows(config_for(env))
    assert {s for s, _ in deliveries.values()} == {"pending"} and len(deliveries) == 12
    assert set(statuses.values()) == {"subscribed"} and suppressed == []
    assert not any(a in mta.sink.delivered() for a in everyone)
    added = run_cli("subscribers", "add", everyone[0], env=env)  # never suppressed: adding them works
    assert added.returncode == 0 and "suppressed" not in added.stdout + added.stderr

    fixed = {**env, "NEWSLETTER_SENDER_ADDRESS": ALLOWED_SENDER}  # the setting fixed: resume
    again = run_cli("send", EXAMPLE, env=fixed)
    assert again.returncode == 0, again.stderr
    mta.wait_delivered_to(everyone)
    delivered = mta.sink.delivered()
    assert {a: delivered[a] for a in everyone} == {a: 1 for a in everyone}
    deliveries, statuses, suppressed = rows(config_for(fixed))
    assert {s for s, _ in deliveries.values()} == {"sent"} and len(deliveries) == 12
    assert set(statuses.values()) == {"subscribed"} and suppressed == []
