"""Sending through the HTTP email APIs (SendGrid, Mailgun, Postmark, Resend, SES) against one
real loopback server that checks each request against the provider's documented shape,
auth and limits (api_server.py): every subscriber gets exactly one message of their own,
batches keep to the limits; only what never reached the provider and 429 are retried (and
Resend's timeouts and 5xx, under its Idempotency-Key); a lost answer or a 5xx leaves the
batch uncertain, resent only on request; a refusal that names one recipient fails only them;
a refusal of the sender, the key or the message stops the run after one request with
everyone pending, and never shows the key."""

import asyncio
import html
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from email.header import decode_header, make_header
from email.utils import getaddresses

import pytest

from api_server import AWS_KEY_ID, AWS_SECRET, KEYS, LIMITS, MAILGUN_DOMAIN, PROVIDERS, SES_REGION, ApiServer
from conftest import EXAMPLE, ROOT, addresses, config_for, subscribe
from newsletter.backends import get_backend
from newsletter.errors import ConfigError, SendError
from newsletter.message import MessageFactory
from newsletter.reader import read_issue
from newsletter.recipients import Recipient
from newsletter.render import Renderer
from newsletter.sender import send_issue
from newsletter.store import Store
from newsletter.tokens import Signer

SECRET = "test-secret-not-for-production"
BATCHED = [p for p in PROVIDERS if LIMITS[p] > 1]  # all but SES, which sends one message a request
TITLES = {"sendgrid": "SendGrid", "mailgun": "Mailgun", "postmark": "Postmark", "resend": "Resend",
          "ses": "Amazon SES"}
ISSUE = EXAMPLE.stem


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch):
    """SES reads the standard AWS variables from the process environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


def api_env(tmp_path, server, provider, send=None, keep_rate=False, **api):
    """Settings for `provider` pointed at the fake server; `api` are [provider] settings
    (batch_size=7), `send` are [send] settings. Resend and SES get no rate limit unless
    keep_rate, so that the tests not about it stay quick."""
    p = provider.upper()
    env = {
        "NEWSLETTER_SECRET": SECRET,
        "NEWSLETTER_DESIGN_TEMPLATES": str(ROOT / "templates"),
        "NEWSLETTER_STORE_PATH": str(tmp_path / "store.sqlite3"),
        "NEWSLETTER_SEND_BACKEND": provider,
        "NEWSLETTER_SEND_OUTBOX": str(tmp_path / "outbox"),
        "NEWSLETTER_SEND_RETRY_DELAY": "0.05",
        "NEWSLETTER_SEND_MAX_WAIT": "10",
        f"NEWSLETTER_{p}_BASE_URL": server.url,
        f"NEWSLETTER_{p}_TIMEOUT": "5",
        f"NEWSLETTER_{p}_MAX_RETRIES": "3",
        f"NEWSLETTER_{p}_RETRY_DELAY": "0.05",
    }
    if provider in KEYS:
        env[f"NEWSLETTER_{p}_API_KEY"] = KEYS[provider]
    if provider == "mailgun":
        env["NEWSLETTER_MAILGUN_DOMAIN"] = MAILGUN_DOMAIN
    if provider == "ses":
        env["NEWSLETTER_SES_REGION"] = SES_REGION
    if provider in ("resend", "ses") and not keep_rate:
        env[f"NEWSLETTER_{p}_REQUESTS_PER_SECOND"] = "0"
    env.update({f"NEWSLETTER_{p}_{k.upper()}": str(v) for k, v in api.items()})
    env.update({f"NEWSLETTER_SEND_{k.upper()}": str(v) for k, v in (send or {}).items()})
    return env


def ledger(config):
    """email -> (state, reply, attempts)"""
    with Store(config.store.path) as store:
        return {e: (s, r, a) for e, s, r, a in store.db.execute("SELECT email, state, reply, attempts FROM deliveries")}


def counts(config):
    with Store(config.store.path) as store:
        return store.counts(ISSUE)


def unsubscribe_url(received) -> str:
    return re.match(r"<([^>]+)>", received.headers["list-unsubscribe"])[1]


def assert_each_has_their_own_message(server, config, everyone):
    """Exactly one message each, addressed to them alone, with their own signed unsubscribe
    URL in the HTML, the text and List-Unsubscribe, and List-Unsubscribe-Post."""
    assert server.delivered() == {a: 1 for a in everyone}
    signer = Signer(SECRET.encode(), config.publication.list_id)
    subject = read_issue(EXAMPLE).subject
    urls = set()
    for r in server.received:
        url = unsubscribe_url(r)
        urls.add(url)
        assert signer.verify(re.search(r"[\w-]+$", url)[0]) == signer.recipient_key(r.address), r.address
        assert f'href="{html.escape(url)}"' in r.html, r.address  # &amp; in HTML ...
        assert url in r.text and html.escape(url) not in r.text.replace(url, ""), r.address  # ... & in text
        assert "mailto:unsubscribe@watchman.example" in r.headers["list-unsubscribe"]
        assert r.headers["list-unsubscribe-post"] == "List-Unsubscribe=One-Click"
        assert [a for _, a in getaddresses([r.to])] == [r.address]  # nobody sees the others
        assert r.subject == subject
        for leftover in ("{{unsubscribe_url}}", "-unsub_html-", "-unsub_text-", "%recipient."):
            assert leftover not in r.html + r.text + str(r.headers), (r.address, leftover)
    assert len(urls) == len(everyone)


# -- every recipient once, batches within the limits --------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_subscriber_gets_exactly_one_message_of_their_own(tmp_path, provider):
    n = 250 if provider != "ses" else 50  # SES: one request a message; 50 show that as well as 250
    everyone = addresses(n)
    with ApiServer() as server:
        # The provider's defaults (batch size; Resend's 2 requests a second), but no rate limit for
        # SES, whose 14 a second is only a number here.
        config = config_for(api_env(tmp_path, server, provider, keep_rate=provider == "resend"))
        assert config.apis[provider].batch_size == LIMITS[provider]
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        assert summary.this_run["sent"] == n and summary.counts["sent"] == n
        assert_each_has_their_own_message(server, config, everyone)
        accepted = server.accepted()
        limit = LIMITS[provider]
        assert len(accepted) == math.ceil(n / limit) == len(server.requests)
        full, rest = divmod(n, limit)
        assert sorted(len(r.recipients) for r in accepted) == sorted([limit] * full + [rest] * bool(rest))
        if provider == "ses":
            assert all(r.sig_verified for r in accepted)
        if provider == "resend":  # 3 batches at 2 a second
            starts = sorted(r.arrived for r in accepted)
            assert starts[-1] - starts[0] >= 0.9 * 1.0
        replies = {reply for _, reply, _ in ledger(config).values()}
        assert all(reply for reply in replies)
        again = send_issue(EXAMPLE, config)  # a finished send sends nobody anything
        assert again.this_run["sent"] == 0 and len(server.received) == n


@pytest.mark.parametrize("provider", PROVIDERS)
def test_an_unsubscribe_url_with_an_ampersand_is_escaped_in_the_html_only(tmp_path, provider):
    with ApiServer() as server:
        env = {**api_env(tmp_path, server, provider),
               "NEWSLETTER_PUBLICATION_UNSUBSCRIBE_URL": "https://watchman.example/u?list=brief&token={token}"}
        config = config_for(env)
        subscribe(config, addresses(3))
        send_issue(EXAMPLE, config)
        assert_each_has_their_own_message(server, config, addresses(3))
        for r in server.received:
            assert "&amp;token=" in r.html and "?list=brief&token=" in r.text
            assert "&amp;" not in r.headers["list-unsubscribe"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_request_states_its_length_and_is_not_chunked(tmp_path, provider):
    # Postmark's and Resend's bodies are streamed a message at a time, their length given up front.
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, provider, batch_size=1 if provider == "ses" else 7))
        subscribe(config, addresses(10))
        assert send_issue(EXAMPLE, config).this_run["sent"] == 10
        assert server.delivered() == {a: 1 for a in addresses(10)}
        for request in server.requests:
            assert "transfer-encoding" not in request.headers
            assert int(request.headers["content-length"]) == len(request.body) > 0
            assert request.headers["content-type"].split(";")[0] in ("application/json", "multipart/form-data")


@pytest.mark.parametrize("provider", ["postmark", "resend"])
def test_a_body_written_in_many_chunks_arrives_whole(tmp_path, provider, monkeypatch):
    from newsletter.backends.http import JsonArray
    monkeypatch.setattr(JsonArray, "CHUNK", 5000)  # a chunk every message or so, not every megabyte
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, provider, batch_size=9))
        subscribe(config, addresses(20))
        assert send_issue(EXAMPLE, config).this_run["sent"] == 20
        assert_each_has_their_own_message(server, config, addresses(20))
        assert sorted(len(r.recipients) for r in server.requests) == [2, 9, 9]
    body = JsonArray([[b'{"a":', b'"\xc3\xa9"}'], [b"{}"], [b"[1,", b"2]"]])
    chunks = list(body.items())
    assert b"".join(chunks) == bytes(body) and len(bytes(body)) == body.length
    assert json.loads(bytes(body)) == [{"a": "é"}, {}, [1, 2]]


NAMES = {"q@example.com": 'Zoë "Z" O\'Brien', "b@example.com": "Back\\slash Ünïcode", "s@example.com": "Line\u2028sep",
         "p@example.com": "100% {curly} <angle>"}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_names_with_quotes_backslashes_and_unicode_reach_the_provider_intact(tmp_path, provider):
    # The request bodies are written by hand (JSON pieces, multipart fields), not by a library.
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, provider))
        with Store(config.store.path) as store:
            for address, name in NAMES.items():
                store.add(Recipient(address, name), "test")
        summary = send_issue(EXAMPLE, config)
        assert summary.this_run["sent"] == len(NAMES)
        assert_each_has_their_own_message(server, config, list(NAMES))
        # (the stand-in shows SendGrid's and SES's names RFC 2047-encoded, as a MIME header would)
        shown = {r.address: str(make_header(decode_header(getaddresses([r.to])[0][0]))) for r in server.received}
        # a name that would break the To header is left out, the address kept
        assert shown == {**NAMES, "s@example.com": ""}


@pytest.mark.parametrize("provider", BATCHED)
def test_a_small_batch_size_is_used(tmp_path, provider):
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, provider, batch_size=7))
        subscribe(config, addresses(20))
        summary = send_issue(EXAMPLE, config)
        assert summary.counts["sent"] == 20
        assert sorted(len(r.recipients) for r in server.accepted()) == [6, 7, 7]
        assert_each_has_their_own_message(server, config, addresses(20))


@pytest.mark.parametrize("provider", BATCHED)
def test_one_over_the_provider_limit_makes_two_requests(tmp_path, provider):
    n = LIMITS[provider] + 1
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, provider))
        subscribe(config, addresses(n))
        summary = send_issue(EXAMPLE, config)
        assert summary.counts["sent"] == n
        assert sorted(len(r.recipients) for r in server.requests) == [1, LIMITS[provider]]
        assert server.delivered() == {a: 1 for a in addresses(n)}


@pytest.mark.parametrize("provider", BATCHED)
def test_batch_size_over_the_provider_limit_is_refused_by_the_settings(tmp_path, provider):
    with ApiServer() as server:
        with pytest.raises(ConfigError, match=f"expected a number from 1 to {LIMITS[provider]}"):
            config_for(api_env(tmp_path, server, provider, batch_size=LIMITS[provider] + 1))


# -- retries: only what never reached the provider, 429, or under Resend's Idempotency-Key ----------

UNSAFE = [p for p in PROVIDERS if p != "resend"]  # no idempotency key: a lost answer is not asked again


def fault_of(config, email):
    with Store(config.store.path) as store:
        return store.db.execute("SELECT fault FROM deliveries WHERE email = ?", (email,)).fetchone()[0]


def suppressed_and_bounced(config):
    with Store(config.store.path) as store:
        return ([e for (e,) in store.db.execute("SELECT email FROM suppressions")],
                [e for (e,) in store.db.execute("SELECT email FROM subscribers WHERE status != 'subscribed'")])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_429_waits_for_retry_after_then_sends(tmp_path, provider):
    with ApiServer() as server:
        server.throttle(1, retry_after=1)
        config = config_for(api_env(tmp_path, server, provider, batch_size=LIMITS[provider]))
        everyone = addresses(3 if provider != "ses" else 1)
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        assert summary.counts["sent"] == len(everyone) and summary.this_run["deferred"] == 0
        assert [r.outcome for r in server.requests] == ["throttled", "accepted"]
        assert server.requests[1].arrived - server.requests[0].arrived >= 0.9 * 1.0
        assert server.delivered() == {a: 1 for a in everyone}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_429_without_retry_after_backs_off_doubling_then_sends(tmp_path, provider):
    with ApiServer() as server:
        server.throttle(2, retry_after=None)
        config = config_for(api_env(tmp_path, server, provider, retry_delay=0.1))
        subscribe(config, ["solo@example.com"])
        summary = send_issue(EXAMPLE, config)
        assert summary.counts["sent"] == 1 and summary.this_run["deferred"] == 0
        assert ledger(config)["solo@example.com"][2] == 1  # one attempt in the ledger: the retries were the client's
        assert [r.outcome for r in server.requests] == ["throttled", "throttled", "accepted"]
        first, second, third = (r.arrived for r in server.requests)
        assert second - first >= 0.9 * 0.1 and third - second >= 0.9 * 0.2  # doubling
        assert server.delivered() == {"solo@example.com": 1}


@pytest.mark.parametrize("provider", UNSAFE)
@pytest.mark.parametrize("status", [500, 503])
def test_a_5xx_is_not_retried_and_leaves_the_batch_uncertain_until_resent_on_request(tmp_path, provider, status):
    everyone = addresses(3)
    with ApiServer() as server:
        server.fail(1, status=status)
        config = config_for(api_env(tmp_path, server, provider, requests_in_flight=1))
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        [failed, *rest] = server.requests
        assert failed.outcome == "failed" and all(r.outcome == "accepted" for r in rest)  # one request, never again
        uncertain = set(failed.recipients)
        assert len(uncertain) == (1 if provider == "ses" else 3)
        states = ledger(config)
        for address in uncertain:
            state, reply, attempts = states[address]
            assert state == "uncertain" and attempts == 1
            assert reply.startswith(f"{TITLES[provider]} API response {status}: ") and "may have been" in reply
        assert summary.this_run["uncertain"] == len(uncertain) and summary.counts["uncertain"] == len(uncertain)
        assert summary.counts["sent"] == 3 - len(uncertain) and not summary.refused
        with Store(config.store.path) as store:
            problems = store.problems(ISSUE)
        assert {(p[0], p[1], p[4]) for p in problems} == {(a, "uncertain", "server") for a in uncertain}
        assert suppressed_and_bounced(config) == ([], [])
        again = send_issue(EXAMPLE, config)  # never resent by itself
        assert again.this_run["sent"] == 0 and len(server.requests) == 1 + len(rest)
        resent = send_issue(EXAMPLE, config, resend_uncertain=True)  # the author's decision: once each
        assert resent.requeued == len(uncertain) and resent.counts["sent"] == 3
        assert server.delivered() == {a: 1 for a in everyone}


@pytest.mark.parametrize("provider", UNSAFE)
def test_a_read_timeout_after_the_body_went_out_leaves_the_batch_uncertain(tmp_path, provider):
    with ApiServer() as server:
        server.slow(0.6, "before")  # the whole body is read; no answer comes; the client gives up at 0.3 s
        config = config_for(api_env(tmp_path, server, provider, timeout=0.3))
        subscribe(config, ["solo@example.com"])
        summary = send_issue(EXAMPLE, config)
        server.wait_idle()
        assert [r.outcome for r in server.requests] == ["dropped"]
        state, reply, attempts = ledger(config)["solo@example.com"]
        assert state == "uncertain" and attempts == 1 and "no answer within 0.3 s (ReadTimeout)" in reply
        assert summary.this_run == {**summary.this_run, "uncertain": 1, "sent": 0, "deferred": 0}
        assert send_issue(EXAMPLE, config, resend_uncertain=True).counts["sent"] == 1
        assert server.delivered() == {"solo@example.com": 1}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_connection_reset_after_the_provider_took_the_request(tmp_path, provider):
    """The provider took it (and would deliver it), then the connection was reset with no answer:
    without an idempotency key that is uncertain and never sent again by itself; Resend asks again
    with the same key and gets the first answer, without a second send."""
    everyone = addresses(2 if provider != "ses" else 1)
    with ApiServer() as server:
        server.reset(1, after=True)
        config = config_for(api_env(tmp_path, server, provider))
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        server.wait_idle()
        assert server.delivered() == {a: 1 for a in everyone}  # the provider did send it
        if provider == "resend":
            assert [r.outcome for r in server.requests] == ["reset after taking it", "replayed"]
            assert summary.counts["sent"] == 2 and summary.counts["uncertain"] == 0
        else:
            assert [r.outcome for r in server.requests] == ["reset after taking it"]
            assert summary.counts["uncertain"] == len(everyone) and summary.counts["sent"] == 0
            for state, reply, _ in ledger(config).values():
                assert state == "uncertain" and "after the request went out" in reply
            assert send_issue(EXAMPLE, config).this_run["sent"] == 0  # not by itself: it did arrive
            assert len(server.requests) == 1 and server.delivered() == {a: 1 for a in everyone}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_connection_that_never_opened_is_retried_then_deferred_and_sent_later(tmp_path, provider):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: connection refused
    try:
        with ApiServer() as server:
            env = api_env(tmp_path, server, provider, max_retries=2, send={"retry_delay": 30, "max_wait": 0})
            config = config_for({**env, f"NEWSLETTER_{provider.upper()}_BASE_URL": nobody})
            subscribe(config, addresses(2))
            first = send_issue(EXAMPLE, config)
            assert first.counts["deferred"] == 2 and first.counts["uncertain"] == 0 and not first.refused
            for state, reply, attempts in ledger(config).values():
                assert state == "deferred" and attempts == 1
                assert "not sent: ConnectError" in reply and reply.endswith("(after 3 attempts)")
            with Store(config.store.path) as store:
                store.db.execute("UPDATE deliveries SET next_try = 0")
            second = send_issue(EXAMPLE, config_for(env))
            assert second.counts["sent"] == 2 and server.delivered() == {a: 1 for a in addresses(2)}
    finally:
        closed.close()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_after_max_retries_the_batch_is_deferred_and_a_later_send_delivers_it(tmp_path, provider):
    everyone = addresses(3)
    with ApiServer() as server:
        server.throttle(3 * len(everyone) if provider == "ses" else 3, retry_after=None)
        env = api_env(tmp_path, server, provider, max_retries=2, requests_in_flight=1,
                      send={"retry_delay": 30, "max_wait": 0})
        config = config_for(env)
        subscribe(config, everyone)
        first = send_issue(EXAMPLE, config)
        assert first.this_run["deferred"] == 3 and first.counts["deferred"] == 3 and first.counts["failed"] == 0
        assert first.stopped and "deferred messages are due" in first.stopped
        assert server.received == [] and all(r.outcome == "throttled" for r in server.requests)
        assert len(server.requests) == 3 * (len(everyone) if provider == "ses" else 1)
        with Store(config.store.path) as store:
            problems = store.problems(ISSUE)
        assert [p[0] for p in problems] == everyone
        for email, state, reply, attempts, fault in problems:
            assert state == "deferred" and attempts == 1 and fault == "server"
            assert reply.startswith(f"{TITLES[provider]} API response 429: ") and reply.endswith("(after 3 attempts)")
        too_soon = send_issue(EXAMPLE, config)  # not due yet: nothing is sent
        assert too_soon.this_run["sent"] == 0 and too_soon.counts["deferred"] == 3
        assert len(server.requests) == 3 * (len(everyone) if provider == "ses" else 1)
        with Store(config.store.path) as store:  # 30 s (with up to 10% jitter) later
            store.db.execute("UPDATE deliveries SET next_try = next_try - 40")
        second = send_issue(EXAMPLE, config)
        assert second.this_run["sent"] == 3 and second.counts == {**second.counts, "sent": 3, "deferred": 0}
        assert server.delivered() == {a: 1 for a in everyone}


def test_a_run_whose_every_request_comes_back_uncertain_is_stopped_by_the_breaker(tmp_path):
    with ApiServer() as server:
        server.fail(50, status=502)
        config = config_for(api_env(tmp_path, server, "sendgrid", batch_size=2, requests_in_flight=1,
                                    send={"breaker": 3}))
        subscribe(config, addresses(20))
        summary = send_issue(EXAMPLE, config)
        assert len(server.requests) == 3  # one request a batch, then the breaker
        assert summary.counts["uncertain"] == 6 and summary.counts["pending"] == 14 and summary.counts["failed"] == 0
        assert "--resend-uncertain" in summary.stopped and "SendGrid API response 502" in summary.stopped


# -- refusals: whose fault, and what happens ------------------------------------------------------------

EXPECTED_4XX = {
    "sendgrid": (400, "Does not contain a valid address."),
    "mailgun": (400, "'to' parameter is not a valid address: r4@example.com"),
    "postmark": (422, "Invalid 'To' address: 'r4@example.com'."),
    "resend": (422, "Invalid `to` field: r4@example.com"),
}


@pytest.mark.parametrize("provider", BATCHED)
def test_a_4xx_naming_one_recipient_fails_only_them_and_the_rest_of_the_batch_goes_at_once(tmp_path, provider):
    everyone = addresses(9)
    with ApiServer() as server:
        server.reject("r4@example.com")
        config = config_for(api_env(tmp_path, server, provider, batch_size=3, requests_in_flight=1))
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        [refused] = server.seen("r4@example.com")  # one request, never retried
        assert refused.outcome == "rejected" and len(refused.recipients) == 3
        # the other two of its batch went again at once, in a request of their own
        assert sorted(len(r.recipients) for r in server.accepted()) == [2, 3, 3]
        state, reply, attempts = ledger(config)["r4@example.com"]
        status, text = EXPECTED_4XX[provider]
        assert state == "failed" and attempts == 1
        assert reply.startswith(f"{TITLES[provider]} API response {status}: ") and text in reply
        assert fault_of(config, "r4@example.com") == "recipient"
        assert suppressed_and_bounced(config) == ([], [])  # malformed for the provider is not "does not exist"
        assert server.delivered() == {a: 1 for a in everyone if a != "r4@example.com"}
        assert summary.counts["sent"] == 8 and summary.counts["failed"] == 1 and not summary.refused
        send_issue(EXAMPLE, config, retry_failed=True)  # the recipient's own failure is not retried
        assert len(server.seen("r4@example.com")) == 1


SENDER_WORDS = {
    "sendgrid": ("SendGrid API response 403: The from address does not match a verified Sender Identity", "SendGrid 403"),
    "postmark": ("Postmark 400: The 'From' address you supplied", "Postmark 400"),
    "resend": ("Resend API response 403: The watchman.example domain is not verified", "Resend 403 validation_error"),
    "ses": ("Amazon SES API response 400: MessageRejected: Email address is not verified. The following identities "
            "failed the check in region EU-WEST-1: ", "SES MessageRejected"),
}


@pytest.mark.parametrize("provider", list(SENDER_WORDS))
def test_an_unverified_sender_costs_one_request_and_leaves_everyone_pending(tmp_path, provider):
    """The issue's headline case (for SES: MessageRejected naming the sender): one request, not one
    per subscriber or per worker; nobody failed, suppressed or bounced; fixed, a later send reaches
    everyone once."""
    everyone = addresses(12)
    with ApiServer() as server:
        server.sender_verified = False
        config = config_for(api_env(tmp_path, server, provider, batch_size=1 if provider == "ses" else 3))
        assert config.apis[provider].requests_in_flight == 4
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        assert len(server.requests) == 1 and server.received == []
        words, code = SENDER_WORDS[provider]
        assert summary.refused and words in summary.refused and "verify [sender] address" in summary.refused
        assert summary.counts["pending"] == 12 and summary.this_run == {**summary.this_run, "failed": 0, "sent": 0}
        assert all(state == "pending" for state, _, _ in ledger(config).values())
        assert suppressed_and_bounced(config) == ([], [])
        refused = server.requests[0].recipients
        for address in refused:
            assert fault_of(config, address) == "sender" and words in ledger(config)[address][1]
        server.sender_verified = True  # verified with the provider
        fixed = send_issue(EXAMPLE, config)
        assert fixed.counts["sent"] == 12 and not fixed.refused
        assert_each_has_their_own_message(server, config, everyone)


REFUSALS = [  # provider, status, the provider's words, its error name/field, the fault, the stop advice
    ("sendgrid", 413, "Payload Too Large", None, "message", "refused the message itself"),
    ("sendgrid", 400, "The subject is required.", "subject", "message", "refused the message itself"),
    ("mailgun", 400, "'to' parameter is not a valid address. please check documentation", None, "message",
     "refused the message itself"),
    ("mailgun", 401, "Forbidden", None, "sender", "refused the API key"),
    ("resend", 422, "Invalid `from` field. The email address needs to follow the `email@example.com` or "
     "`Name <email@example.com>` format.", "validation_error", "sender", "sending account"),
    ("resend", 429, "You have reached your daily email sending quota.", "daily_quota_exceeded", "sender",
     "will not let this account send now"),
    ("resend", 409, "This idempotency key has been used on a request with a different payload.",
     "invalid_idempotent_request", "message", "refused the message itself"),
    ("postmark", 422, "Invalid JSON", 402, "message", "refused the message itself"),
    ("postmark", 422, "The message stream 'broadcast' does not exist on this server.", 1235, "sender",
     "message_stream"),
    ("ses", 400, "Sending paused for this account.", "SendingPausedException", "sender",
     "will not let this account send now"),
    ("ses", 400, "Daily message quota exceeded.", "LimitExceededException", "sender", "will not let this account"),
    ("ses", 404, "Configuration set <newsletter-events> does not exist.", "NotFoundException", "sender",
     "configuration_set"),
    ("ses", 400, "Message contains invalid content (a virus).", "MessageRejected", "message",
     "refused the message itself"),
    ("ses", 400, "Invalid Destination.", "BadRequestException", "message", "refused the message itself"),
]


@pytest.mark.parametrize("provider,status,words,name,fault,advice", REFUSALS,
                         ids=[f"{p}-{s}-{n or s}" for p, s, _, n, _, _ in REFUSALS])
def test_a_whole_request_refusal_stops_the_run_with_everyone_pending(tmp_path, provider, status, words, name,
                                                                    fault, advice):
    with ApiServer() as server:
        if provider == "sendgrid":
            server.refuse(status, words, field=name)
        else:
            server.refuse(status, words, code=name)
        config = config_for(api_env(tmp_path, server, provider, batch_size=1 if provider == "ses" else 2))
        subscribe(config, addresses(6))
        summary = send_issue(EXAMPLE, config)
        assert len(server.requests) == 1 and server.received == []  # never retried, nobody else tried
        assert summary.refused and words in summary.refused and advice in summary.refused, summary.refused
        assert summary.counts["pending"] == 6 and summary.counts["failed"] == 0
        assert suppressed_and_bounced(config) == ([], [])
        for address in server.requests[0].recipients:
            assert fault_of(config, address) == fault and words in ledger(config)[address][1]
        assert send_issue(EXAMPLE, config).counts["sent"] == 6  # the provider fixed: everyone, once
        assert server.delivered() == {a: 1 for a in addresses(6)}


def test_postmark_inactive_recipient_is_failed_and_suppressed_while_the_rest_is_sent(tmp_path):
    everyone = addresses(5)
    with ApiServer() as server:
        server.inactive("r2@example.com")
        config = config_for(api_env(tmp_path, server, "postmark"))
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        assert len(server.requests) == 1
        assert server.delivered() == {a: 1 for a in everyone if a != "r2@example.com"}
        states = ledger(config)
        state, reply, _ = states["r2@example.com"]
        assert state == "failed" and reply.startswith("Postmark 406: You tried to send to a recipient that has been "
                                                      "marked as inactive.")
        assert fault_of(config, "r2@example.com") == "recipient"
        ids = {r.address: r.id for r in server.received}
        for address in ids:  # and each sent one has its own MessageID
            assert states[address][0] == "sent" and ids[address] in states[address][1]
        with Store(config.store.path) as store:
            assert store.suppressed("r2@example.com")
            assert dict(store.db.execute("SELECT email, status FROM subscribers WHERE status != 'subscribed'")) == {
                "r2@example.com": "bounced"}
        assert summary.counts["sent"] == 4 and summary.counts["failed"] == 1 and not summary.refused
        send_issue(EXAMPLE, config)
        assert len(server.seen("r2@example.com")) == 1


def test_resend_permissive_error_fails_only_that_email(tmp_path):
    everyone = addresses(5)
    with ApiServer() as server:
        server.inactive("r1@example.com", "r3@example.com")
        config = config_for(api_env(tmp_path, server, "resend"))
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        [request] = server.requests
        assert request.headers["x-batch-validation"] == "permissive"
        assert server.delivered() == {a: 1 for a in ("r0@example.com", "r2@example.com", "r4@example.com")}
        states = ledger(config)
        for address in ("r1@example.com", "r3@example.com"):
            assert states[address][:2] == ("failed", f"Resend: The `to` address {address} is on the suppression list.")
            assert fault_of(config, address) == "recipient"
        for r in server.received:  # the ids in data[] are matched to the right emails around the errors
            assert states[r.address][0] == "sent" and r.id in states[r.address][1]
        assert summary.counts["sent"] == 3 and summary.counts["failed"] == 2
        # on Resend's suppression list: Resend will never deliver to them, so neither do we
        assert sorted(suppressed_and_bounced(config)[0]) == ["r1@example.com", "r3@example.com"]


# -- the key: refused, missing, never shown -------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_refused_key_stops_the_run_with_everything_still_pending(tmp_path, provider, monkeypatch):
    wrong = "wrong-K3y-That-Must-Never-Leak-9999"
    with ApiServer() as server:
        env = api_env(tmp_path, server, provider, batch_size=min(2, LIMITS[provider]))
        if provider == "ses":
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)  # signed, but with the wrong secret
        else:
            env[f"NEWSLETTER_{provider.upper()}_API_KEY"] = wrong
        config = config_for(env)
        subscribe(config, addresses(7))
        summary = send_issue(EXAMPLE, config)
        text = summary.refused
        assert text and f"{TITLES[provider]} API response 40" in text and "refused the API key" in text
        assert wrong not in text and AWS_SECRET not in text and KEYS.get(provider, AWS_SECRET) not in text
        assert counts(config)["pending"] == 7 and counts(config)["failed"] == 0
        assert server.received == [] and len(server.requests) == 1  # the first request goes alone
        assert {r.outcome for r in server.requests} == {"unauthorized"}
        assert all(wrong not in (reply or "") for _, reply, _ in ledger(config).values())
        if provider == "ses":
            assert "SignatureDoesNotMatch" in text
        # With the right key, the next run sends everyone once.
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
        summary = send_issue(EXAMPLE, config_for(api_env(tmp_path, server, provider)))
        assert summary.counts["sent"] == 7 and server.delivered() == {a: 1 for a in addresses(7)}


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p in KEYS])
def test_a_missing_key_stops_before_any_request(tmp_path, provider):
    with ApiServer() as server:
        env = api_env(tmp_path, server, provider)
        del env[f"NEWSLETTER_{provider.upper()}_API_KEY"]
        config = config_for(env)
        subscribe(config, addresses(2))
        with pytest.raises(SendError, match=f"NEWSLETTER_{provider.upper()}_API_KEY is not set"):
            send_issue(EXAMPLE, config)
        assert server.requests == [] and counts(config)["pending"] == 2


def cli(args, env):
    run = subprocess.run([sys.executable, "-m", "newsletter", *map(str, args)], cwd=ROOT,
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    return run.returncode, run.stdout, run.stderr


def test_the_cli_sends_through_postmark_and_never_prints_the_key(tmp_path):
    with ApiServer() as server:
        env = {**api_env(tmp_path, server, "postmark"), "NEWSLETTER_SEND_BACKEND": "outbox"}
        subscribe(config_for(env), addresses(4))
        code, out, err = cli(["send", EXAMPLE, "--backend", "postmark"], env)
        assert code == 0, err
        assert f"{ISSUE}: sent 4, deferred 0, failed 0, uncertain 0, skipped 0" in out
        assert f"postmark {server.url}" in err  # the progress line names where it sends
        code, status_out, status_err = cli(["status", ISSUE], env)
        for text in (out, err, status_out, status_err):
            assert KEYS["postmark"] not in text and "Traceback" not in text
        assert server.delivered() == {a: 1 for a in addresses(4)}

        wrong = "wrong-postmark-K3y-That-Must-Never-Leak-8888"
        subscribe(config_for(env), ["late@example.com"])
        code, out, err = cli(["send", EXAMPLE, "--backend", "postmark"], {
            **env, "NEWSLETTER_POSTMARK_API_KEY": wrong})
        assert code == 2 and "stopped: the provider refused the API key" in err
        assert "Postmark API response 401: The Server API Token" in err and "NEWSLETTER_<BACKEND>_API_KEY" in err
        assert wrong not in out + err and "Traceback" not in err
        assert counts(config_for(env))["pending"] == 1


def test_the_cli_exits_2_when_ses_refuses_the_sender_and_0_once_it_is_verified(tmp_path):
    with ApiServer() as server:
        server.sender_verified = False
        env = api_env(tmp_path, server, "ses")
        subscribe(config_for(env), addresses(5))
        code, out, err = cli(["send", EXAMPLE], env)
        assert code == 2, (out, err)
        assert "stopped: the provider has not verified the sender: verify [sender] address" in err
        assert "MessageRejected: Email address is not verified" in err and "Traceback" not in err
        assert "ledger (deliveries): 0 sent, 5 pending, 0 deferred, 0 failed, 0 uncertain, 0 skipped" in out
        assert len(server.requests) == 1
        server.sender_verified = True
        code, out, err = cli(["send", EXAMPLE], env)
        assert code == 0, err
        assert server.delivered() == {a: 1 for a in addresses(5)}


def test_the_cli_exits_1_while_uncertain_messages_wait_for_a_decision(tmp_path):
    with ApiServer() as server:
        server.fail(1, status=500)
        env = api_env(tmp_path, server, "sendgrid", batch_size=2, requests_in_flight=1)
        subscribe(config_for(env), addresses(4))
        code, out, err = cli(["send", EXAMPLE], env)
        assert code == 1, (out, err)
        assert f"{ISSUE}: sent 2, deferred 0, failed 0, uncertain 2, skipped 0" in out and "Traceback" not in err
        code, status_out, _ = cli(["status", ISSUE], env)
        assert code == 1 and "--resend-uncertain" in status_out and "SendGrid API response 500" in status_out
        code, out, err = cli(["send", EXAMPLE], env)  # by itself: nothing more
        assert code == 1 and len(server.requests) == 2
        code, out, err = cli(["send", EXAMPLE, "--resend-uncertain"], env)
        assert code == 0, err
        assert server.delivered() == {a: 1 for a in addresses(4)}


# -- Resend: rate limit and Idempotency-Key --------------------------------------------------------

def test_resend_default_rate_of_two_requests_a_second_is_honoured(tmp_path):
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, "resend", keep_rate=True, batch_size=2))
        assert config.apis["resend"].requests_per_second == 2.0
        subscribe(config, addresses(6))
        send_issue(EXAMPLE, config)
        starts = sorted(r.arrived for r in server.accepted())
        assert len(starts) == 3
        assert starts[-1] - starts[0] >= 0.9 * 1.0
        assert all(b - a >= 0.9 * 0.5 for a, b in zip(starts, starts[1:]))


def test_resend_retry_carries_the_same_idempotency_key_and_body(tmp_path):
    with ApiServer() as server:
        server.fail(1)
        config = config_for(api_env(tmp_path, server, "resend", batch_size=2, requests_in_flight=1))
        subscribe(config, addresses(4))
        send_issue(EXAMPLE, config)
        first, retry, other = server.requests
        assert [first.outcome, retry.outcome, other.outcome] == ["failed", "accepted", "accepted"]
        assert first.idempotency_key and 1 <= len(first.idempotency_key) <= 256
        assert retry.idempotency_key == first.idempotency_key and retry.json() == first.json()
        assert other.idempotency_key and other.idempotency_key != first.idempotency_key
        assert server.delivered() == {a: 1 for a in addresses(4)}


def test_resend_lost_answer_is_retried_without_sending_twice(tmp_path):
    everyone = addresses(3)
    with ApiServer() as server:
        server.slow(0.8, "after")  # taken and recorded, but the answer comes after the client gave up
        config = config_for(api_env(tmp_path, server, "resend", timeout=0.3, requests_in_flight=1))
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        server.wait_idle()
        assert [r.outcome for r in server.requests] == ["accepted", "replayed"]
        assert server.requests[0].idempotency_key == server.requests[1].idempotency_key
        assert server.delivered() == {a: 1 for a in everyone}
        assert summary.counts["sent"] == 3
        states = ledger(config)
        for r in server.received:  # the replayed answer names the first request's emails
            assert r.id in states[r.address][1]


def test_resend_retry_while_the_first_request_is_still_in_progress_waits_for_it(tmp_path):
    everyone = addresses(3)
    with ApiServer() as server:
        server.slow(0.7, "during")  # the key is in progress for 0.7 s; the client gives up at 0.3 s
        config = config_for(api_env(tmp_path, server, "resend", timeout=0.3, requests_in_flight=1, max_retries=5,
                                    retry_delay=0.1))
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        server.wait_idle()
        assert server.delivered() == {a: 1 for a in everyone}  # the first request did deliver
        assert summary.counts["sent"] == 3 and summary.counts["failed"] == 0
        outcomes = [r.outcome for r in server.requests]  # 409 concurrent_idempotent_requests, then the replay
        assert outcomes[0] == "accepted" and "conflict" in outcomes and outcomes[-1] == "replayed"


def test_resend_crashed_send_resumes_with_the_same_keys_and_does_not_send_twice(tmp_path):
    everyone = addresses(4)
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, "resend", batch_size=2, requests_in_flight=1))
        subscribe(config, everyone)
        send_issue(EXAMPLE, config)
        keys = [r.idempotency_key for r in server.requests]
        with Store(config.store.path) as store:  # as if killed before any answer was recorded
            store.db.execute("UPDATE deliveries SET state = 'sending'")
        resumed = send_issue(EXAMPLE, config)  # in flight: uncertain, not sent again by itself
        assert sorted(resumed.found_in_flight) == everyone and resumed.counts["uncertain"] == 4
        assert len(server.requests) == 2
        resumed = send_issue(EXAMPLE, config, resend_uncertain=True)
        assert [r.outcome for r in server.requests[2:]] == ["replayed", "replayed"]
        assert [r.idempotency_key for r in server.requests[2:]] == keys
        assert server.delivered() == {a: 1 for a in everyone}
        assert resumed.counts["sent"] == 4


# -- SES -------------------------------------------------------------------------------------------

def test_ses_signs_each_message_and_sends_one_request_each(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "fake-session-token")
    everyone = addresses(5)
    with ApiServer(aws_token="fake-session-token") as server:
        config = config_for(api_env(tmp_path, server, "ses"))
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        assert summary.counts["sent"] == 5
        assert len(server.requests) == 5 and all(r.sig_verified for r in server.requests)
        for request in server.requests:
            assert f"Credential={AWS_KEY_ID}/" in request.headers["authorization"]
            assert f"/{SES_REGION}/ses/aws4_request" in request.headers["authorization"]
            assert "x-amz-security-token" in request.headers["authorization"]
            body = request.json()
            assert body["Destination"] == {"ToAddresses": [request.recipients[0]]}
            assert "ListManagementOptions" not in body  # or SES adds its own List-Unsubscribe
        assert_each_has_their_own_message(server, config, everyone)
        for r in server.received:  # the raw MIME itself carries both headers
            assert r.headers["list-unsubscribe"].startswith("<https://watchman.example/unsubscribe/")
            assert r.headers["message-id"] and r.headers["from"]
        ids = {r.address: r.id for r in server.received}
        for address, (state, reply, _) in ledger(config).items():
            assert state == "sent" and ids[address] in reply


def test_ses_without_aws_credentials_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, "ses"))
        subscribe(config, addresses(2))
        with pytest.raises(SendError, match="ses: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set"):
            send_issue(EXAMPLE, config)
        assert server.requests == [] and counts(config)["pending"] == 2


# -- Mailgun -----------------------------------------------------------------------------------------

def test_mailgun_eu_base_url_is_used_as_given(tmp_path):
    with ApiServer(prefixes=("", "/eu")) as server:  # /eu stands for https://api.eu.mailgun.net
        config = config_for(api_env(tmp_path, server, "mailgun", base_url=server.url + "/eu"))
        subscribe(config, addresses(3))
        summary = send_issue(EXAMPLE, config)
        assert summary.counts["sent"] == 3
        assert [(r.path, r.prefix) for r in server.requests] == [(f"/eu/v3/{MAILGUN_DOMAIN}/messages", "/eu")]
        assert_each_has_their_own_message(server, config, addresses(3))
        message_ids = {r.headers["message-id"] for r in server.received}  # h:Message-Id per recipient
        assert len(message_ids) == 3 and all(re.fullmatch(r"<[^<>@]+@watchman\.example>", m) for m in message_ids)


def test_mailgun_without_a_domain_is_a_clear_error(tmp_path):
    with ApiServer() as server:
        env = api_env(tmp_path, server, "mailgun")
        del env["NEWSLETTER_MAILGUN_DOMAIN"]
        config = config_for(env)
        subscribe(config, addresses(2))
        with pytest.raises(SendError, match=r"mailgun: \[mailgun\] domain is not set"):
            send_issue(EXAMPLE, config)
        assert server.requests == [] and counts(config)["pending"] == 2


def test_mailgun_unknown_domain_stops_the_run_with_everyone_still_pending(tmp_path):
    """A wrong domain (or one of the other region) is a settings problem, like a bad key:
    every batch would fail alike, so nobody may be marked failed for good."""
    with ApiServer() as server:
        config = config_for({**api_env(tmp_path, server, "mailgun", batch_size=2),
                             "NEWSLETTER_MAILGUN_DOMAIN": "mg.example.org"})
        subscribe(config, addresses(5))
        summary = send_issue(EXAMPLE, config)
        assert "Mailgun API response 404: Domain not found: mg.example.org" in summary.refused
        assert "[mailgun] domain" in summary.refused
        assert [r.status for r in server.requests] == [404]  # the first request goes alone
        assert counts(config)["pending"] == 5 and counts(config)["failed"] == 0


# -- resuming ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
def test_rows_left_sending_become_uncertain_and_are_resent_once_on_request(tmp_path, provider):
    everyone = addresses(6)
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, provider))
        subscribe(config, everyone)
        with Store(config.store.path) as store:  # an earlier run that died with two in flight
            store.enqueue_subscribers(ISSUE, Signer(SECRET.encode(), config.publication.list_id).recipient_key)
            store.db.execute("UPDATE deliveries SET state = 'sent' WHERE email IN ('r0@example.com', 'r1@example.com')")
            store.db.execute("UPDATE deliveries SET state = 'sending', attempts = 1"
                             " WHERE email IN ('r2@example.com', 'r3@example.com')")
        summary = send_issue(EXAMPLE, config)
        assert summary.found_in_flight == ["r2@example.com", "r3@example.com"]
        assert server.delivered() == {a: 1 for a in everyone[4:]}  # they may have been delivered: not by itself
        assert summary.this_run["sent"] == 2
        assert summary.counts == {"pending": 0, "sending": 0, "sent": 4, "deferred": 0, "failed": 0, "skipped": 0,
                                  "uncertain": 2}
        for address in ("r2@example.com", "r3@example.com"):
            assert ledger(config)[address][0] == "uncertain"
        resent = send_issue(EXAMPLE, config, resend_uncertain=True)
        assert resent.requeued == 2 and resent.this_run["sent"] == 2
        assert server.delivered() == {a: 1 for a in everyone[2:]}
        assert resent.counts == {**resent.counts, "sent": 6, "uncertain": 0}
        states = ledger(config)
        assert states["r2@example.com"][2] == 1 and states["r4@example.com"][2] == 1  # counted afresh once requeued


# -- known gaps, against the real server ---------------------------------------------------------------

# Regression: SendGrid's X-RateLimit-Reset was once ignored (it sends no Retry-After).
def test_sendgrid_429_waits_for_x_ratelimit_reset(tmp_path):
    with ApiServer() as server:
        server.rate_limited_until = math.ceil(time.time()) + 1
        config = config_for(api_env(tmp_path, server, "sendgrid"))
        subscribe(config, addresses(2))
        summary = send_issue(EXAMPLE, config)
        assert summary.counts["sent"] == 2
        assert [r.outcome for r in server.requests] == ["throttled", "accepted"]


# Regression: deferral jitter was once drawn per row, splitting a deferred batch.
def test_a_deferred_batch_is_retried_as_one_batch(tmp_path):
    with ApiServer() as server:
        server.throttle(3, retry_after=None)
        config = config_for(api_env(tmp_path, server, "postmark", max_retries=2, send={"retry_delay": 0.5}))
        subscribe(config, addresses(40))
        summary = send_issue(EXAMPLE, config)
        assert summary.counts["sent"] == 40 and server.delivered() == {a: 1 for a in addresses(40)}
        assert [len(r.recipients) for r in server.accepted()] == [40]


# Regression: a deferred Resend batch once came back in pieces under new Idempotency-Keys.
def test_resend_deferred_batch_whose_answers_were_lost_is_not_sent_twice(tmp_path):
    everyone = addresses(40)
    with ApiServer() as server:
        server.slow(0.6, "after")  # taken, answer lost
        server.slow(0.6, "before")  # the retry: no answer either; the batch is deferred
        config = config_for(api_env(tmp_path, server, "resend", timeout=0.3, max_retries=1, requests_in_flight=1,
                                    send={"retry_delay": 1.0}))
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        server.wait_idle()
        assert summary.counts["sent"] == 40
        assert server.delivered() == {a: 1 for a in everyone}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_provider_sends_everyone_once_on_either_store(tmp_path, store_backend, provider):
    """The send's ledger (SQLite's, or PostgreSQL's ServerLedger with its group commits): a
    throttled first request, then every reader once, each row sent after one attempt."""
    from conftest import store_of
    everyone = addresses(45)
    with ApiServer() as server:
        server.throttle(1, retry_after=None)
        config = config_for(api_env(tmp_path, server, provider, requests_in_flight=3))
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
        with store_of(config) as store:
            rows = set(store.db.execute("SELECT state, attempts, via FROM deliveries"))
        assert server.delivered() == {a: 1 for a in everyone}
    assert summary.counts["sent"] == 45 and rows == {("sent", 1, provider)}


def test_a_malformed_retry_after_falls_back_to_backoff(tmp_path):
    with ApiServer() as server:
        server.throttle(1, retry_after="in a moment")
        config = config_for(api_env(tmp_path, server, "postmark"))
        subscribe(config, addresses(2))
        summary = send_issue(EXAMPLE, config)
        assert summary.counts["sent"] == 2 and summary.this_run["deferred"] == 0
        assert [r.outcome for r in server.requests] == ["throttled", "accepted"]


@pytest.mark.parametrize("provider", ["mailgun", "resend", "ses"])
# Regression: an unexpected 2xx body once crashed Mailgun's, Resend's and SES's results().
def test_a_2xx_answer_of_an_unexpected_shape_does_not_crash_the_send(tmp_path, provider):
    with ApiServer() as server:
        server.garble(1)
        config = config_for(api_env(tmp_path, server, provider))
        subscribe(config, ["solo@example.com"])
        summary = send_issue(EXAMPLE, config)
        assert summary.counts["sending"] == 0


def test_a_send_whose_workers_all_crash_ends_instead_of_hanging(tmp_path):
    """Every worker dies of an exception that is not SendError (the AttributeError above):
    the producer must not wait for ever on the full queue."""
    with ApiServer() as server:
        server.garble(50)
        env = api_env(tmp_path, server, "resend", batch_size=2)  # 15 batches; the queue holds 4
        subscribe(config_for(env), addresses(30))
        run = subprocess.Popen([sys.executable, "-m", "newsletter", "send", str(EXAMPLE)], cwd=ROOT,
                               env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            run.communicate(timeout=4)  # a normal run of these 30 takes about a second
        except subprocess.TimeoutExpired:
            run.kill()
            run.communicate()
            pytest.fail("the send hung")


# -- unit-level: the fake server itself rejects what the providers reject ------------------------------

def _messages(config, n):
    rendered = Renderer(config).render(read_issue(EXAMPLE))
    signer = Signer(SECRET.encode(), config.publication.list_id)
    factory = MessageFactory(rendered, config, signer)
    return [factory.build(a, f"Reader {i}", signer.recipient_key(a)) for i, a in enumerate(addresses(n))]


def _raw(backend, messages, *, mutate=None, method=None, path=None, auth=True):
    """One request as the backend builds it (changed by `mutate`), straight to the server."""
    async def go():
        await backend.open_worker()
        try:
            spec = backend.build(messages)
            if mutate:
                mutate(spec)
            request = backend.client.build_request(method or spec.method, path or spec.path, json=spec.json,
                                                   data=spec.data, content=spec.content, headers=spec.headers)
            if auth:
                return await backend.client.send(backend.sign(request))
            for name in ("authorization", "x-postmark-server-token"):
                request.headers.pop(name, None)
            return await backend.client.send(request, auth=None)
        finally:
            await backend.close()
    return asyncio.run(go())


def _edit_json(spec, change):
    """Change a request's JSON body, whether the backend gave it as `json` or as bytes."""
    if spec.json is not None:
        change(spec.json)
    else:
        body = json.loads(bytes(spec.content))
        change(body)
        spec.content = json.dumps(body).encode()
        spec.headers.pop("Content-Length", None)


def _drop(provider):
    """Remove a required field from the request."""
    def mutate(spec):
        if provider == "sendgrid":
            _edit_json(spec, lambda body: body.pop("from"))
        elif provider == "mailgun":
            boundary = spec.headers["Content-Type"].split("boundary=")[1].encode()
            parts = spec.content.split(b"--" + boundary + b"\r\n")
            kept = [p for p in parts if not p.startswith(b'Content-Disposition: form-data; name="subject"')]
            assert len(kept) == len(parts) - 1
            spec.content = (b"--" + boundary + b"\r\n").join(kept)
        elif provider == "postmark":
            _edit_json(spec, lambda body: (body[0].pop("HtmlBody"), body[0].pop("TextBody")))
        elif provider == "resend":
            _edit_json(spec, lambda body: body[0].pop("subject"))
            spec.headers["x-batch-validation"] = "strict"
        else:
            _edit_json(spec, lambda body: body.pop("FromEmailAddress"))
    return mutate


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_fake_server_refuses_what_the_provider_refuses(tmp_path, provider):
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, provider))
        backend = lambda: get_backend(provider, config, ISSUE)  # noqa: E731
        ok = _raw(backend(), _messages(config, 2 if provider != "ses" else 1))
        assert 200 <= ok.status_code < 300 and len(server.received) == (2 if provider != "ses" else 1)

        wrong_method = _raw(backend(), _messages(config, 1), method="PUT")
        assert wrong_method.status_code == 405
        wrong_path = _raw(backend(), _messages(config, 1), path="/v3/mail/sending")
        assert wrong_path.status_code == 404
        no_auth = _raw(backend(), _messages(config, 1), auth=False)
        assert no_auth.status_code in (401, 403)

        missing = _raw(backend(), _messages(config, 1), mutate=_drop(provider))
        if provider == "postmark":  # per message, in a 200 answer
            assert missing.status_code == 200 and missing.json()[0]["ErrorCode"] == 300
        else:
            assert 400 <= missing.status_code < 500
        if provider == "ses":
            def fifty_one(spec):
                _edit_json(spec, lambda body: body["Destination"].update(ToAddresses=addresses(51)))
            over = _raw(backend(), _messages(config, 1), mutate=fifty_one)
            assert over.status_code == 400 and over.headers["x-amzn-errortype"].startswith("BadRequestException:")
        else:
            over = _raw(backend(), _messages(config, LIMITS[provider] + 1))
            assert over.status_code in (400, 422)
        assert len(server.received) == (2 if provider != "ses" else 1)  # nothing else was taken
        shapes = {"sendgrid": "errors", "mailgun": "message", "postmark": "Message", "resend": "message",
                  "ses": "message"}
        assert shapes[provider] in over.json()


# -- hand-written request bodies and the batch-at-a-time ledger ----------------------------------------

def _items(provider, request):
    """What one request says for each message: a dict per message (Mailgun: the form's fields)."""
    if provider == "sendgrid":
        return [request.json()]
    if provider == "mailgun":
        from api_server import _form_fields
        fields: dict[str, list[str]] = {}
        for name, value in _form_fields(request):
            fields.setdefault(name, []).append(value)
        return [fields]
    if provider in ("postmark", "resend"):
        return request.json()
    return [request.json()]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_reply_to_reaches_every_provider(tmp_path, provider):
    # SendGrid's and Mailgun's shared fields are encoded once per issue; Reply-To is among them.
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, provider))
        reply_to = config.sender.reply_to
        assert reply_to
        subscribe(config, addresses(3))
        assert send_issue(EXAMPLE, config).this_run["sent"] == 3
        for request in server.requests:
            for item in _items(provider, request):
                if provider == "sendgrid":
                    assert item["reply_to"] == {"email": reply_to}
                elif provider == "mailgun":
                    assert item["h:Reply-To"] == [reply_to]
                elif provider == "postmark":
                    assert item["ReplyTo"] == reply_to
                elif provider == "resend":
                    assert item["reply_to"] == reply_to
        if provider == "ses":
            assert all(r.headers["reply-to"] == reply_to for r in server.received)


@pytest.mark.parametrize("configuration_set", [None, "newsletter-events"])
def test_ses_configuration_set_is_named_in_every_request(tmp_path, configuration_set):
    # The SES body is joined as bytes around the base64, the configuration set in its tail.
    with ApiServer() as server:
        extra = {"configuration_set": configuration_set} if configuration_set else {}
        config = config_for(api_env(tmp_path, server, "ses", **extra))
        subscribe(config, addresses(3))
        assert send_issue(EXAMPLE, config).this_run["sent"] == 3
        assert len(server.requests) == 3
        for request in server.requests:
            body = request.json()
            assert body.get("ConfigurationSetName") == configuration_set
            assert sorted(body) == sorted(["FromEmailAddress", "Destination", "Content"]
                                          + (["ConfigurationSetName"] if configuration_set else []))


def test_sendgrid_leaves_out_names_it_refuses_and_sends_to_nameless_subscribers(tmp_path):
    # SendGrid refuses a whole request (every one of up to 1,000 recipients) for a , or ; in one name.
    names = {"comma@example.com": "Doe, Jane", "semi@example.com": "A; B", "none@example.com": None,
             "empty@example.com": "", "fine@example.com": "Jane Doe"}
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, "sendgrid"))
        with Store(config.store.path) as store:
            for address, name in names.items():
                store.add(Recipient(address, name), "test")
        summary = send_issue(EXAMPLE, config)
        assert summary.this_run["sent"] == len(names) and summary.counts["failed"] == 0
        assert_each_has_their_own_message(server, config, list(names))
        [request] = server.requests
        to = {p["to"][0]["email"]: p["to"][0] for p in request.json()["personalizations"]}
        assert {a: t.get("name") for a, t in to.items()} == {**dict.fromkeys(names), "fine@example.com": "Jane Doe"}
        for p in request.json()["personalizations"]:  # the id a webhook event carries back
            assert p["custom_args"]["message_id"] == p["headers"]["X-Newsletter-Message-Id"]
            assert "<" not in p["custom_args"]["message_id"]


QUOTE_URL = 'https://watchman.example/u?q="a\\b"&token={token}'


@pytest.mark.parametrize("provider", PROVIDERS)
def test_an_unsubscribe_url_and_list_name_with_quotes_and_backslashes_reach_every_provider(tmp_path, provider):
    # The URL goes into hand-written JSON strings (SendGrid substitutions and headers, Postmark's and
    # Resend's spliced bodies), the list name into List-Id.
    with ApiServer() as server:
        env = {**api_env(tmp_path, server, provider), "NEWSLETTER_PUBLICATION_UNSUBSCRIBE_URL": QUOTE_URL,
               "NEWSLETTER_PUBLICATION_NAME": 'The "Watchman" \\ Brief'}
        config = config_for(env)
        subscribe(config, addresses(3))
        summary = send_issue(EXAMPLE, config)
        assert summary.this_run["sent"] == 3, ledger(config)
        assert_each_has_their_own_message(server, config, addresses(3))
        for r in server.received:
            assert '?q="a\\b"&token=' in r.text and "?q=&quot;a\\b&quot;&amp;token=" in r.html
            assert r.headers["list-id"] == f'"The \\"Watchman\\" \\\\ Brief" <{config.publication.list_id}>'


def test_a_retry_after_too_long_to_wait_for_defers_the_batch_until_then(tmp_path):
    # The provider's Retry-After (over MAX_RETRY_AFTER) sets when the deferred rows fall due.
    with ApiServer() as server:
        server.throttle(1, retry_after=600)
        config = config_for(api_env(tmp_path, server, "postmark", send={"retry_delay": 1, "max_wait": 0}))
        subscribe(config, addresses(3))
        before = time.time()
        summary = send_issue(EXAMPLE, config)
        assert summary.counts["deferred"] == 3 and len(server.requests) == 1
        with Store(config.store.path) as store:
            due = [t for (t,) in store.db.execute("SELECT next_try FROM deliveries")]
        assert all(before + 590 <= t <= time.time() + 610 for t in due), [t - before for t in due]


def test_mailgun_body_is_strict_multipart_form_data_with_every_field(tmp_path):
    # Written by hand: each part opened by CRLF "--" boundary, closed by "--" boundary "--" (RFC 7578,
    # RFC 2046 section 5.1.1), which a stricter parser than the stand-in's needs exactly.
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, "mailgun"))
        subscribe(config, addresses(3))
        assert send_issue(EXAMPLE, config).this_run["sent"] == 3
        [request] = server.requests
    boundary = re.fullmatch(r"multipart/form-data; boundary=([0-9a-f]{32})", request.headers["content-type"])[1]
    body = request.body.removesuffix(b"\r\n")  # (a CRLF after the close-delimiter is optional)
    assert body.startswith(f"--{boundary}\r\n".encode()) and body.endswith(f"\r\n--{boundary}--".encode())
    parts = body[len(f"--{boundary}\r\n"):-len(f"\r\n--{boundary}--")].split(f"\r\n--{boundary}\r\n".encode())
    fields = []
    for part in parts:
        head, sep, value = part.partition(b"\r\n\r\n")
        assert sep and re.fullmatch(rb'Content-Disposition: form-data; name="[\w:-]+"', head), head
        fields.append((head.split(b'"')[1].decode(), value.decode("utf-8")))
    names = [n for n, _ in fields]
    assert sorted(set(names)) == sorted(["from", "to", "subject", "text", "html", "h:List-Unsubscribe",
                                         "h:List-Unsubscribe-Post", "h:List-Id", "h:Message-Id", "h:Reply-To",
                                         "o:tracking-clicks", "recipient-variables"])
    values = dict(fields)
    assert names.count("to") == 3 and values["o:tracking-clicks"] == "no"
    assert values["h:List-Id"] == f"The Watchman Brief <{config.publication.list_id}>"
    assert json.loads(values["recipient-variables"]).keys() == set(addresses(3))


@pytest.mark.parametrize("provider", ["sendgrid", "mailgun"])
def test_a_backend_used_for_a_test_send_and_then_the_real_send_sends_each_its_own_content(tmp_path, provider):
    # What every request shares is kept per issue: the real send must not reuse the proof's "[TEST]" subject.
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, provider))
        backend = get_backend(provider, config, ISSUE)
        send_issue(EXAMPLE, config, test_addresses=["proof@example.com"], backend=backend)
        subscribe(config, addresses(2))
        assert send_issue(EXAMPLE, config, backend=backend).this_run["sent"] == 2
        subjects = {r.address: r.subject for r in server.received}
        assert subjects["proof@example.com"].startswith("[TEST] ")
        real = read_issue(EXAMPLE).subject
        assert subjects["r0@example.com"] == subjects["r1@example.com"] == real


def test_the_progress_line_counts_every_message_of_a_batch(tmp_path):
    # Outcomes are recorded a group of rows at a time; the progress line must still count each.
    import io
    from newsletter.progress import ProgressLine
    with ApiServer() as server:
        server.throttle(1, retry_after=600)  # the first batch of 40 is deferred, one reply for all
        config = config_for(api_env(tmp_path, server, "sendgrid", batch_size=40, requests_in_flight=1,
                                    send={"max_wait": 0}))
        subscribe(config, addresses(100))
        stream = io.StringIO()
        summary = send_issue(EXAMPLE, config, progress=ProgressLine(stream=stream))
        assert summary.this_run["sent"] == 60 and summary.this_run["deferred"] == 40
        last = stream.getvalue().strip().splitlines()[-1]
        assert " 100/100 " in last and last.endswith("deferred 40 sent 60"), last


def test_a_json_array_body_is_written_a_chunk_at_a_time(monkeypatch):
    # The point of JsonArray: a 20 MB Postmark batch is never joined whole.
    from newsletter.backends.http import JsonArray
    monkeypatch.setattr(JsonArray, "CHUNK", 5000)
    objects = [[b'{"n":', str(i).encode(), b',"x":"', b"y" * 990, b'"}'] for i in range(40)]
    body = JsonArray(objects)
    chunks = list(body.items())
    assert b"".join(chunks) == bytes(body) and len(bytes(body)) == body.length
    assert [o["n"] for o in json.loads(bytes(body))] == list(range(40))
    assert len(chunks) >= 7
    assert all(5000 <= len(c) < 5000 + 1100 for c in chunks[:-1]), [len(c) for c in chunks]


def test_a_deferred_batch_of_rows_with_different_attempt_counts_records_each_by_its_own_count(tmp_path):
    # One batch, one deferred outcome, rows grouped into one UPDATE per (state, reply, next_try):
    # each row still backs off by its own attempts, and the one at max_attempts fails.
    attempts = {"r0@example.com": 0, "r1@example.com": 1, "r2@example.com": 2, "r3@example.com": 4,
                "r4@example.com": 0}
    with ApiServer() as server:
        server.throttle(3, retry_after=None)
        config = config_for(api_env(tmp_path, server, "postmark", max_retries=2,
                                    send={"retry_delay": 100, "max_wait": 0, "max_attempts": 5}))
        subscribe(config, list(attempts))
        with Store(config.store.path) as store:
            store.enqueue_subscribers(ISSUE, Signer(SECRET.encode(), config.publication.list_id).recipient_key)
            for address, n in attempts.items():
                store.db.execute("UPDATE deliveries SET attempts = ? WHERE email = ?", (n, address))
        before = time.time()
        summary = send_issue(EXAMPLE, config)
        after = time.time()
        assert len(server.requests) == 3 and {len(r.recipients) for r in server.requests} == {5}
        assert summary.this_run["deferred"] == 4 and summary.this_run["failed"] == 1
        with Store(config.store.path) as store:
            rows = {e: (s, r, a, t) for e, s, r, a, t in
                    store.db.execute("SELECT email, state, reply, attempts, next_try FROM deliveries")}
    state, reply, count, _ = rows["r3@example.com"]
    assert state == "failed" and count == 5
    assert reply.startswith("gave up after 5 attempts; last reply: Postmark API response 429: ")
    delays = {}
    for address in ("r0@example.com", "r1@example.com", "r2@example.com", "r4@example.com"):
        state, reply, count, next_try = rows[address]
        assert state == "deferred" and count == attempts[address] + 1 and reply.endswith("(after 3 attempts)")
        delays[address] = next_try - before
    jitter = delays["r0@example.com"] / 100
    assert 0.9 <= jitter <= 1.1 + (after - before) / 100
    assert delays["r4@example.com"] == delays["r0@example.com"]  # one jitter for the batch
    for address, factor in (("r1@example.com", 2), ("r2@example.com", 4)):
        assert abs(delays[address] - factor * 100 * jitter) < 1 + (after - before), delays


@pytest.mark.parametrize("provider", ["postmark", "resend"])
def test_postmark_and_resend_requests_are_streamed_with_their_length_up_front(tmp_path, provider):
    from newsletter.backends.http import JsonArray
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, provider))
        spec = get_backend(provider, config, ISSUE).build(_messages(config, 3))
    assert isinstance(spec.content, JsonArray)  # not joined into one bytes object
    assert spec.headers["Content-Length"] == str(len(bytes(spec.content)))
    assert [item["to"] if provider == "resend" else item["To"] for item in json.loads(bytes(spec.content))] == [
        [f'"Reader {i}" <r{i}@example.com>'] if provider == "resend" else f'"Reader {i}" <r{i}@example.com>'
        for i in range(3)]


# -- SES against moto (an independent SES v2 implementation), when installed ---------------------------

@pytest.fixture
def moto_ses(monkeypatch):
    """moto's SES v2 server on loopback: (its URL, a botocore sesv2 client for it)."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    import botocore.session
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = botocore.session.get_session().create_client(
        "sesv2", region_name=SES_REGION, endpoint_url=url, aws_access_key_id=AWS_KEY_ID,
        aws_secret_access_key=AWS_SECRET)
    try:
        yield url, client
    finally:
        server.stop()


def test_ses_against_moto_an_unverified_sender_stops_the_run_then_a_verified_one_sends(tmp_path, moto_ses):
    url, client = moto_ses
    with ApiServer() as unused:  # api_env wants a server; moto is the one that answers
        env = {**api_env(tmp_path, unused, "ses", batch_size=1), "NEWSLETTER_SES_BASE_URL": url}
    config = config_for(env)
    subscribe(config, addresses(6))
    summary = send_issue(EXAMPLE, config)
    assert summary.refused and "MessageRejected" in summary.refused and config.sender.address in summary.refused
    assert summary.counts["pending"] == 6 and summary.counts["failed"] == 0
    assert suppressed_and_bounced(config) == ([], [])
    assert {fault_of(config, a) for a in addresses(6)} <= {"sender", None}
    client.create_email_identity(EmailIdentity=config.sender.address)  # moto verifies it at once
    fixed = send_issue(EXAMPLE, config)
    assert fixed.counts["sent"] == 6 and not fixed.refused
    for state, reply, _ in ledger(config).values():
        assert state == "sent" and reply.startswith("200 MessageId ")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_bounce_address_is_never_the_from_address(tmp_path, provider):
    # [send] bounce_address is the envelope sender for SMTP (VERP, with {token}); through an
    # API the reader must still see [sender] address in From, never the bounce mailbox.
    with ApiServer() as server:
        env = {**api_env(tmp_path, server, provider), "NEWSLETTER_SEND_BOUNCE_ADDRESS": "bounces+{token}@watchman.example"}
        config = config_for(env)
        subscribe(config, addresses(2))
        assert send_issue(EXAMPLE, config).this_run["sent"] == 2, ledger(config)
        for request in server.requests:  # no API takes our envelope sender: its {token} is never filled in
            body = request.body.decode("utf-8", "replace")
            assert "bounces+" not in body and "bounces%2B" not in body, body[:300]
            assert provider == "ses" or config.sender.address in body  # SES: in the base64 of the raw message


class _GarbledGzip:
    """An HTTP server on loopback that reads each request whole and answers 202 with a body
    that says it is gzip and is not (a broken proxy, a provider's bad day)."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests = 0
        import threading
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, body = data.split(b"\r\n\r\n", 1)
                length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests += 1
                garbage = b"this is not gzip at all"
                conn.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(garbage), garbage))

    def close(self):
        self.listener.close()


def test_an_answer_that_cannot_be_decoded_is_uncertain_not_a_crash(tmp_path):
    # The request went out and the provider answered, but the answer cannot be read: the
    # messages may have been delivered (uncertain, never resent by itself), and the user gets
    # a sentence, not a traceback.
    server = _GarbledGzip()
    try:
        config = config_for(api_env(tmp_path, server, "sendgrid", send={"breaker": 0}))
        subscribe(config, addresses(3))
        summary = send_issue(EXAMPLE, config)
        assert server.requests == 1  # never sent again
        assert summary.counts["uncertain"] == 3 and summary.counts["sending"] == 0
    finally:
        server.close()
