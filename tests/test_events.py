"""What comes back after a send goes through one policy (outcome.event_effect) into the store."""

import pytest

from conftest import addresses, config_for, store_of, subscribe
from newsletter.outcome import COMPLAINT, HARD_BOUNCE, SOFT_BOUNCE, UNSUBSCRIBE, Event
from test_send import settings_env

pytestmark = pytest.mark.usefixtures("store_backend")  # each test on SQLite and on PostgreSQL


@pytest.fixture
def store(tmp_path):
    config = config_for(settings_env(tmp_path, 1))
    subscribe(config, addresses(4))
    with store_of(config) as store:
        for address in addresses(4):
            store.db.execute("INSERT INTO deliveries (issue, email, rkey, state, updated_at) VALUES (?, ?, ?, 'sent', 't')",
                             ("issue", address, f"key-{address}"))
        yield store


def standing(store, email):
    status = store.db.execute("SELECT status FROM subscribers WHERE email = ?", (email,)).fetchone()[0]
    state = store.db.execute("SELECT state FROM deliveries WHERE email = ?", (email,)).fetchone()[0]
    return status, store.suppressed(email), state


def test_each_kind_of_event_does_what_the_policy_says(store):
    assert store.record_event(Event(HARD_BOUNCE, "r0@example.com", "dsn", "550 5.1.1 no such user", "a", "issue"))
    assert standing(store, "r0@example.com") == ("bounced", True, "failed")
    assert store.record_event(Event(COMPLAINT, "r1@example.com", "sendgrid webhook", "spamreport", "b", "issue"))
    assert standing(store, "r1@example.com") == ("complained", True, "sent")
    assert store.record_event(Event(UNSUBSCRIBE, "r2@example.com", "one-click"))
    assert standing(store, "r2@example.com") == ("unsubscribed", False, "sent")
    assert not store.record_event(Event(SOFT_BOUNCE, "r3@example.com", "dsn", "452 4.2.2 mailbox full", "c"))
    assert standing(store, "r3@example.com") == ("subscribed", False, "sent")
    assert store.blocked(addresses(4)) == {"r0@example.com", "r1@example.com", "r2@example.com"}


def test_an_event_delivered_twice_changes_nothing_twice(store):
    event = Event(HARD_BOUNCE, "r0@example.com", "mailgun webhook", "bounced", "evt-1", "issue")
    assert store.record_event(event)
    store.restore(["r0@example.com"])  # put back by hand
    assert not store.record_event(event)  # the replay does not suppress them again
    assert standing(store, "r0@example.com")[:2] == ("subscribed", False)
    assert store.record_event(Event(HARD_BOUNCE, "r0@example.com", "mailgun webhook", "bounced", "evt-2"))


def test_a_recipient_key_names_its_address(store):
    assert store.email_for_key("key-r2@example.com") == "r2@example.com"
    assert store.email_for_key("no-such-key") is None
