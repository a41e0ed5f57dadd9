"""Faults, injected: one table of what a mail server or an email API can do wrong while
`newsletter send` runs as a user runs it (a process, against a real server on loopback),
every row held to the same oracle (`audit`):

- nothing lost: each recipient ends sent, or pending, deferred, failed or uncertain with
  the reason in the ledger (and the run's summary says how many of each);
- nothing doubled: a recipient the ledger calls sent got exactly one message at the server,
  one it calls uncertain got 0 or 1, any other got none;
- a clear summary: the exit status and the words on stderr that say what happened.

Each row then runs `send` again once the server behaves (the recovery), and the same oracle
holds, with nothing left to send. The faults that tests/test_smtp_hardening.py,
test_refusals.py, test_send.py and test_api_backends.py probe in detail (garbled replies,
STARTTLS injection, refusals of the sender, a lost answer after the provider took a batch)
are not repeated here.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pytest

from api_server import AWS_KEY_ID, AWS_SECRET, PROVIDERS, ApiServer
from conftest import EXAMPLE, addresses, config_for, run_cli, subscribe
from newsletter.store import Store
from rogue_smtp import RogueServer
from smtp_server import PASSWORD, USER, Handler, Server, free_port, make_certificate
from test_api_backends import TITLES, api_env
from test_send import settings_env

ISSUE = EXAMPLE.stem
RUN_LINE = re.compile(rf"^{ISSUE}: sent (\d+), deferred (\d+), failed (\d+), uncertain (\d+), skipped (\d+)$", re.M)
LEDGER_LINE = re.compile(r"^ledger \(deliveries\): (\d+) sent, (\d+) pending, (\d+) deferred, (\d+) failed, "
                         r"(\d+) uncertain, (\d+) skipped$", re.M)
STATES = ("sent", "pending", "deferred", "failed", "uncertain", "skipped")


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def aws(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


# -- the oracle ----------------------------------------------------------------------------------

def ledger(env) -> dict[str, tuple[str, str | None]]:
    with Store(config_for(env).store.path) as store:
        return {e: (s, r) for e, s, r in store.db.execute(
            "SELECT email, state, reply FROM deliveries WHERE issue = ? AND destination = 'mail'", (ISSUE,))}


def audit(env, everyone: list[str], delivered: Counter, run=None, done: bool = False) -> Counter:
    """The three promises, checked against the ledger, the server's count and the run's
    output; returns the ledger's states. `done`: nothing may be left pending or deferred."""
    rows = ledger(env)
    assert set(rows) == set(everyone), "a recipient has no row in the ledger"
    assert set(delivered) <= set(everyone), f"mail to someone not on the list: {set(delivered) - set(everyone)}"
    for address in everyone:
        state, reply = rows[address]
        got = delivered[address]
        assert state != "sending", f"{address} left in flight after the run ended"
        if state == "sent":
            assert got == 1, f"{address}: the ledger says sent, the server got {got}"
        elif state == "uncertain":
            assert got in (0, 1) and reply, f"{address}: uncertain, {got} at the server, reply {reply!r}"
        else:
            assert got == 0, f"{address}: {state} in the ledger, but the server got {got}"
            if state in ("deferred", "failed"):
                assert reply, f"{address}: {state} with no reason"
    states = Counter(state for state, _ in rows.values())
    if done:
        assert states["pending"] == states["deferred"] == 0, states
    if run is not None and (found := LEDGER_LINE.search(run.stdout)):  # the summary tells the ledger as it is
        assert dict(zip(STATES, map(int, found.groups()))) == {s: states[s] for s in STATES}, run.stdout
    if run is not None and run.returncode == 2:  # stopped: why, and what it left
        assert "newsletter: " in run.stderr or "stopped: " in run.stderr, run.stderr
        left = (f"stopped: the ledger holds {states['sent']} sent, {states['pending']} pending, "
                f"{states['deferred']} deferred, {states['failed']} failed, {states['uncertain']} uncertain")
        assert left in run.stderr or LEDGER_LINE.search(run.stdout), run.stderr
    return states


@dataclass
class Trial:
    """What a row of the table hands the oracle: the first run (under the fault), the
    server's count after it, and how to run again once the server behaves."""
    env: dict
    everyone: list[str]
    run: object  # subprocess.CompletedProcess
    delivered: Counter
    recover: Callable[[], tuple[object, Counter]]  # -> (the run, the server's count over both runs)


@dataclass
class Fault:
    scenario: Callable[..., Trial]
    exit: int  # of the run under the fault
    says: str  # in its stderr (or stdout, for the counts line)
    then: int = 0  # the exit of the run after it
    states: dict | None = None  # the ledger after the recovery, where it is not "everyone sent"


def smtp_env(tmp_path, port, cert=None, **extra):
    return settings_env(tmp_path, port, cert, **{"smtp_timeout": 2, **extra})


def plain_env(tmp_path, port, **extra):
    """No TLS, no login: for the raw-socket server."""
    env = smtp_env(tmp_path, port, smtp_security="none", **extra)
    del env["NEWSLETTER_SMTP_USERNAME"], env["NEWSLETTER_SMTP_PASSWORD"]
    return env


def healthy_smtp(port, cert, prior: Counter, *args, env) -> tuple[object, Counter]:
    """Run send against a server that works, on the same port."""
    handler = Handler()
    with Server(handler, tls=cert, port=port):
        run = run_cli("send", EXAMPLE, *args, env=env)
    return run, prior + handler.delivered()


# -- SMTP ----------------------------------------------------------------------------------------

def refused_connections(tmp_path, cert) -> Trial:
    """Nothing listens on the port: the run stops at once, everyone pending."""
    port = free_port()
    env = smtp_env(tmp_path, port, cert, smtp_connections=2)
    everyone = addresses(10)
    subscribe(config_for(env), everyone)
    run = run_cli("send", EXAMPLE, env=env)
    return Trial(env, everyone, run, Counter(), lambda: healthy_smtp(port, cert, Counter(), env=env))


def refused_for_a_while(tmp_path, cert) -> Trial:
    """The server stops listening after its second connection and is back a second later:
    the run waits for it (within give_up_after) and ends with everyone sent."""
    port = free_port()
    servers: list[RogueServer] = []

    def come_back():
        servers.append(RogueServer(port=port).__enter__())

    def hook(n, verb):
        if n == 3 and verb == "GREETING":
            threading.Timer(1.0, come_back).start()
            return "vanish"
        return None

    env = plain_env(tmp_path, port, smtp_connections=1, smtp_messages_per_connection=3, smtp_give_up_after=30)
    everyone = addresses(12)
    subscribe(config_for(env), everyone)
    with RogueServer(port=port, hook=hook) as first:
        servers.append(first)
        run = run_cli("send", EXAMPLE, env=env)
    for server in servers[1:]:
        server.vanish()
    assert len(servers) == 2, "the server never came back"
    delivered = sum((s.delivered() for s in servers), Counter())
    # Everyone was sent: the next run has nothing to do, and needs no server for it.
    return Trial(env, everyone, run, delivered, lambda: (run_cli("send", EXAMPLE, env=env), delivered))


def silent_greeting(tmp_path, cert, which: str) -> Trial:
    """A server that accepts the connection and never says 220: on the first connection the
    run stops (it looks like a wrong port); on a later one only that connection waits."""
    silent = [True]

    def hook(n, verb):
        if verb == "GREETING" and silent[0] and (which == "first" or n == 2):
            return b""  # nothing: the client waits for smtp.timeout
        return None

    server = RogueServer(hook=hook).__enter__()
    env = plain_env(tmp_path, server.port, smtp_timeout=1, smtp_connections=2, smtp_messages_per_connection=3)
    everyone = addresses(10)
    subscribe(config_for(env), everyone)
    run = run_cli("send", EXAMPLE, env=env)
    delivered = server.delivered()

    def recover():
        silent[0] = False
        try:
            again = run_cli("send", EXAMPLE, env=env)
            return again, server.delivered()
        finally:
            server.vanish()
    return Trial(env, everyone, run, delivered, recover)


def drop_in_data(tmp_path, cert) -> Trial:
    """The connection is cut in the middle of a message's content: it may or may not have
    arrived as far as we can know, so it is uncertain, reported, and resent only on request."""
    def hook(n, verb):
        return "drop" if n == 3 and verb == "CONTENT" else None

    server = RogueServer(hook=hook).__enter__()
    env = plain_env(tmp_path, server.port, smtp_connections=1, smtp_messages_per_connection=2)
    everyone = addresses(8)
    subscribe(config_for(env), everyone)
    run = run_cli("send", EXAMPLE, env=env)
    delivered = server.delivered()

    def recover():
        try:
            plain = run_cli("send", EXAMPLE, env=env)  # uncertain: not resent by itself
            assert plain.returncode == 1 and server.delivered() == delivered, plain.stderr
            again = run_cli("send", EXAMPLE, "--resend-uncertain", env=env)
            return again, server.delivered()
        finally:
            server.vanish()
    return Trial(env, everyone, run, delivered, recover)


def busy_for_a_while(tmp_path, cert, give_up_after: float) -> Trial:
    """After the first messages, 421 to every greeting and every MAIL FROM: for 1.5 s (then
    the run rides it out), or until the recovery (then give_up_after stops the run)."""
    state = {"since": None, "over": False}
    server = RogueServer(tls=cert, auth=(USER, PASSWORD))

    def hook(n, verb):
        if state["since"] is None and len(server.received) >= 3:
            state["since"] = time.monotonic()
        busy = state["since"] is not None and not state["over"] and (
            give_up_after > 5 and time.monotonic() - state["since"] < 1.5 or give_up_after <= 5)
        if busy and verb in ("GREETING", "MAIL"):
            return b"421 4.3.2 Service not available, closing transmission channel\r\n"
        return None

    server.hook = hook
    server.__enter__()
    env = smtp_env(tmp_path, server.port, cert, smtp_connections=2, smtp_messages_per_connection=2,
                   smtp_give_up_after=give_up_after)
    everyone = addresses(16)
    subscribe(config_for(env), everyone)
    run = run_cli("send", EXAMPLE, env=env)
    delivered = server.delivered()

    def recover():
        state["over"] = True
        try:
            return run_cli("send", EXAMPLE, env=env), server.delivered()
        finally:
            server.vanish()
    return Trial(env, everyone, run, delivered, recover)


def starttls_refused(tmp_path, cert) -> Trial:
    """The server offers STARTTLS and then answers it 454: never carry on in the clear."""
    refuse = [True]
    server = RogueServer(tls=cert, auth=(USER, PASSWORD), hook=lambda n, verb: (
        b"454 4.7.0 TLS not available due to local problem\r\n" if verb == "STARTTLS-REPLY" and refuse[0] else None))
    server.__enter__()
    env = smtp_env(tmp_path, server.port, cert, smtp_connections=2)
    everyone = addresses(6)
    subscribe(config_for(env), everyone)
    run = run_cli("send", EXAMPLE, env=env)
    after_starttls = [c for s in server.sessions for c in s.commands[s.commands.index("STARTTLS") + 1:]]
    assert after_starttls == [], f"went on in the clear after STARTTLS was refused: {after_starttls}"
    delivered = server.delivered()

    def recover():
        refuse[0] = False
        try:
            return run_cli("send", EXAMPLE, env=env), server.delivered()
        finally:
            server.vanish()
    return Trial(env, everyone, run, delivered, recover)


def wrong_host_certificate(tmp_path, cert) -> Trial:
    """A certificate that is trusted (its CA file is given) but names another host."""
    other = make_certificate(tmp_path, host="mail.other.example")
    handler = Handler()
    port = free_port()
    env = smtp_env(tmp_path, port, other)
    everyone = addresses(6)
    subscribe(config_for(env), everyone)
    with Server(handler, tls=other, port=port):
        run = run_cli("send", EXAMPLE, env=env)
    assert handler.attempts == Counter() and handler.received == []
    fixed = {**env, "NEWSLETTER_SMTP_CA_FILE": str(cert[0])}  # the server gets its own certificate
    return Trial(env, everyone, run, handler.delivered(), lambda: healthy_smtp(port, cert, Counter(), env=fixed))


GONE = "550 5.1.1 <r3@example.com>: Recipient address rejected: User unknown in virtual mailbox table"


def some_recipients_refused(tmp_path, cert) -> Trial:
    """Some recipients taken, others refused for good (their own fault, or the server's
    policy), one deferred once: the others are all sent, each refusal is failed with its
    reply, and a later run resends nothing."""
    script = {"r3@example.com": [GONE], "r5@example.com": ["552 5.2.2 Mailbox full"],
              "r7@example.com": ["451 4.7.1 Greylisted, try again"],
              "r9@example.com": ["550 5.7.1 Recipient address rejected: Access denied"]}
    handler = Handler(script=script)
    port = free_port()
    env = smtp_env(tmp_path, port, cert, smtp_connections=2)
    everyone = addresses(12)
    subscribe(config_for(env), everyone)
    with Server(handler, tls=cert, port=port):
        run = run_cli("send", EXAMPLE, env=env)
    delivered = handler.delivered()
    assert handler.attempts["r7@example.com"] == 2 and delivered["r7@example.com"] == 1
    return Trial(env, everyone, run, delivered, lambda: healthy_smtp(port, cert, delivered, env=env))


SMTP_FAULTS = {
    "refused connections": Fault(refused_connections, 2, "cannot connect: connection refused"),
    "refused for a while, then back": Fault(refused_for_a_while, 0, ""),
    "a greeting that never comes (first connection)": Fault(
        lambda t, c: silent_greeting(t, c, "first"), 2, "no greeting from the server: no reply within 1 s"),
    "a greeting that never comes (a later connection)": Fault(lambda t, c: silent_greeting(t, c, "later"), 0, ""),
    "a drop in the middle of DATA": Fault(drop_in_data, 1, "uncertain 1"),
    "421 to everything for 1.5 s": Fault(lambda t, c: busy_for_a_while(t, c, 60), 0, ""),
    "421 to everything past give_up_after": Fault(
        lambda t, c: busy_for_a_while(t, c, 1), 2, "no connection got through for"),
    "STARTTLS refused": Fault(starttls_refused, 2, "STARTTLS refused: 454 4.7.0"),
    "a certificate for another host": Fault(
        wrong_host_certificate, 2, "certificate is not trusted: IP address mismatch, certificate is not valid for "
                                  "'127.0.0.1'"),
    "some recipients accepted, others refused": Fault(
        some_recipients_refused, 1, "failed 3", states={"sent": 9, "failed": 3}),
}


@pytest.mark.parametrize("name", SMTP_FAULTS)
def test_smtp_fault(tmp_path, cert, name):
    fault = SMTP_FAULTS[name]
    trial = fault.scenario(tmp_path, cert)
    run = trial.run
    assert run.returncode == fault.exit, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    assert fault.says in run.stderr + run.stdout, run.stderr + run.stdout
    states = audit(trial.env, trial.everyone, trial.delivered, run)
    if fault.exit == 2:  # stopped: nobody failed or suppressed by it, the rest waits
        assert states["failed"] == 0 and states["sent"] + states["pending"] + states["deferred"] == len(trial.everyone)
    again, delivered = trial.recover()
    assert again.returncode == fault.then, f"exit {again.returncode}\n{again.stdout}\n{again.stderr}"
    states = audit(trial.env, trial.everyone, delivered, again, done=True)
    assert {s: n for s, n in states.items() if n} == (fault.states or {"sent": len(trial.everyone)})


def test_a_refused_recipient_is_told_with_its_reply(tmp_path, cert):
    """The summary of the partly refused send, as `status` tells it."""
    trial = some_recipients_refused(tmp_path, cert)
    status = run_cli("status", ISSUE, env=trial.env)
    assert f"failed: r3@example.com (1 attempt, recipient's fault): {GONE}" in status.stdout
    assert "failed: r5@example.com (1 attempt, recipient's fault): 552 5.2.2 Mailbox full" in status.stdout
    assert "failed: r9@example.com (1 attempt, server's fault): 550 5.7.1" in status.stdout


# -- the email APIs ------------------------------------------------------------------------------

IDEMPOTENT = ("resend",)  # an Idempotency-Key: a lost answer is asked again, harmlessly
PER_MESSAGE = ("postmark", "resend")  # a batch's answer says, message by message, which were taken


def storm_429(server, provider, retry_after):
    server.throttle(12, retry_after=retry_after)


def html_502(server, provider):
    server.page(3, status=502)


def fail_after(server, provider):
    server.fail(2, status=500, after=True)


def cut(server, provider):
    server.cut(2)


def html_200(server, provider):
    server.page(1, status=200, body=b"<html><body><h1>Welcome to the hotel network</h1></body></html>")


def half_refused(server, provider):
    server.inactive(*addresses(12)[1::2])


@dataclass
class ApiFault:
    inject: Callable
    providers: tuple[str, ...]
    exit: Callable[[str], int]  # the first run's exit status, by provider
    says: Callable[[str], str]
    resend: bool = False  # the recovery asks for the uncertain ones again (--resend-uncertain)
    then: Callable[[str], int] = lambda p: 0
    states: Callable[[str], dict] | None = None


def batch(provider):
    return 1 if provider == "ses" else 3


def uncertain_unless_idempotent(provider):
    return 0 if provider in IDEMPOTENT else 1


API_FAULTS = {
    "429 storm with Retry-After": ApiFault(
        lambda s, p: storm_429(s, p, 0.05), PROVIDERS, lambda p: 0, lambda p: ""),
    "429 storm without Retry-After": ApiFault(
        lambda s, p: storm_429(s, p, None), PROVIDERS, lambda p: 0, lambda p: ""),
    "502 from a proxy, an HTML page": ApiFault(
        html_502, PROVIDERS, uncertain_unless_idempotent,
        lambda p: "" if p in IDEMPOTENT else f"uncertain {3 * batch(p)}: {TITLES[p]} API response 502: 502 Bad Gateway; "
                                             "it may have been delivered", resend=True),
    "500 after the provider took it": ApiFault(
        fail_after, PROVIDERS, uncertain_unless_idempotent, lambda p: "" if p in IDEMPOTENT else "uncertain",
        then=uncertain_unless_idempotent, states=lambda p: None if p in IDEMPOTENT else {"sent": 12 - 2 * batch(p), "uncertain": 2 * batch(p)}),
    "a connection reset in the middle of the request": ApiFault(
        cut, PROVIDERS, lambda p: -1, lambda p: "", resend=True),
    "a 200 that is an HTML page, not the provider's answer": ApiFault(
        html_200, PROVIDERS, uncertain_unless_idempotent,
        lambda p: "" if p in IDEMPOTENT else "not the provider's answer", resend=True),
    "half the batch refused, message by message": ApiFault(
        half_refused, PER_MESSAGE, lambda p: 1, lambda p: "failed 6",
        states=lambda p: {"sent": 6, "failed": 6}),
}
API_CASES = [(name, p) for name, f in API_FAULTS.items() for p in f.providers]


@pytest.mark.parametrize("name,provider", API_CASES, ids=[f"{n}-{p}" for n, p in API_CASES])
def test_api_fault(tmp_path, aws, name, provider):
    fault = API_FAULTS[name]
    everyone = addresses(12)
    with ApiServer() as server:
        env = api_env(tmp_path, server, provider, batch_size=batch(provider), requests_in_flight=2)
        subscribe(config_for(env), everyone)
        fault.inject(server, provider)
        run = run_cli("send", EXAMPLE, env=env)
        server.wait_idle()
        expected = fault.exit(provider)
        if expected >= 0:
            assert run.returncode == expected, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
        else:  # the client cannot know whether the provider took it: sent again (it never arrived) or uncertain
            assert run.returncode in (0, 1), f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
        assert fault.says(provider) in run.stderr + run.stdout, run.stderr + run.stdout
        audit(env, everyone, server.delivered(), run)
        again = run_cli("send", EXAMPLE, *(["--resend-uncertain"] if fault.resend else []), env=env)
        server.wait_idle()
        assert again.returncode == fault.then(provider), f"exit {again.returncode}\n{again.stdout}\n{again.stderr}"
        states = audit(env, everyone, server.delivered(), again, done=True)
    want = (fault.states(provider) if fault.states else None) or {"sent": len(everyone)}
    assert {s: n for s, n in states.items() if n} == want
