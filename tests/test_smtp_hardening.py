"""The SMTP client against servers that misbehave, on loopback (tests/rogue_smtp.py, plain
sockets and ssl): STARTTLS injection, reconnects that fail, EHLO refused, replies that are
not SMTP, the EHLO name, and verify_tls = false said out loud."""

import asyncio
import re
import time

import pytest

from conftest import EXAMPLE, addresses, config_for, run_cli, subscribe
from newsletter.backends.smtp import ServerUnreachable, SmtpConnection, ehlo_name
from newsletter.errors import SendError
from newsletter.sender import send_issue
from newsletter.store import Store
from rogue_smtp import RogueServer
from smtp_server import PASSWORD, USER, Handler, Server, free_port, make_certificate
from test_send import settings_env


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


def ledger(config):
    with Store(config.store.path) as store:
        return store.counts(EXAMPLE.stem)


# -- 1. STARTTLS injection (CVE-2011-0411 class) ---------------------------------------------------

@pytest.mark.parametrize("inject", [True, False], ids=["injected", "honest"])
def test_bytes_sent_before_the_tls_handshake_are_refused_as_tampering(tmp_path, cert, inject):
    # A man in the middle (or a buggy server) sends replies in the clear right after the 220:
    # read after the handshake, they would pass for the server's answers inside TLS.
    injected = b"250-evil\r\n250 AUTH PLAIN\r\n"
    with RogueServer(tls=cert, auth=(USER, PASSWORD),
                     hook=lambda n, verb: injected if inject and verb == "STARTTLS" else None) as server:
        config = config_for(settings_env(tmp_path, server.port, cert))
        subscribe(config, addresses(2))
        if inject:
            with pytest.raises(SendError, match="sent data before the TLS handshake: possible tampering; refusing"):
                send_issue(EXAMPLE, config)
            assert ledger(config)["pending"] == 2
            assert not any(c.upper().startswith(("MAIL", "AUTH", "EHLO")) for c in server.commands()[2:])
            assert server.delivered() == {}
        else:  # the same server without the injection: the client goes on and delivers
            assert send_issue(EXAMPLE, config).counts["sent"] == 2
            assert server.delivered() == {a: 1 for a in addresses(2)}
    assert server.sessions and all(s.commands[:2] == [s.commands[0], "STARTTLS"] for s in server.sessions)


# -- 2. a failed reconnect defers that connection's messages -----------------------------------------

def test_connections_that_fail_are_retried_while_the_others_go_on(tmp_path, cert):
    # Connection 2 (the second worker's first) gets a 421, connection 3 is dropped before the
    # greeting; then the server works. Nobody is lost or doubled, and the run ends well.
    def hook(n, verb):
        if verb == "GREETING" and n == 2:
            return b"421 4.3.2 Too busy, try later\r\n"
        if verb == "GREETING" and n == 3:
            return "drop"
        return None

    with RogueServer(tls=cert, auth=(USER, PASSWORD), hook=hook) as server:
        env = settings_env(tmp_path, server.port, cert, smtp_connections=2, smtp_messages_per_connection=2)
        everyone = addresses(8)
        subscribe(config_for(env), everyone)
        result = run_cli("send", EXAMPLE, env=env)
        assert result.returncode == 0, result.stderr
        assert server.delivered() == {a: 1 for a in everyone}
        assert len(server.sessions) >= 5
    counts = ledger(config_for(env))
    assert counts["sent"] == 8 and counts["pending"] == counts["deferred"] == counts["failed"] == 0
    with Store(config_for(env).store.path) as store:
        attempts = dict(store.db.execute("SELECT email, attempts FROM deliveries"))
    # Connection 2 failed while the run opened it (no message in hand); the message that met
    # connection 3 was deferred, and went on its second attempt.
    assert sorted(attempts.values()) == [1] * 7 + [2]


def test_the_run_stops_when_no_connection_gets_through_for_give_up_after(tmp_path, cert):
    # The server goes away after its first message: connections are refused from then on.
    port = free_port()
    with RogueServer(tls=cert, auth=(USER, PASSWORD), port=port,
                     hook=lambda n, verb: "vanish" if n == 2 and verb == "GREETING" else None) as server:
        env = settings_env(tmp_path, port, cert, smtp_connections=1, smtp_messages_per_connection=1,
                           smtp_give_up_after=1)
        everyone = addresses(6)
        subscribe(config_for(env), everyone)
        result = run_cli("send", EXAMPLE, env=env)
    assert result.returncode == 2, result.stderr
    assert "no connection got through for" in result.stderr and "cannot connect: connection refused" in result.stderr
    assert "run send again once the server is back" in result.stderr
    counts = ledger(config_for(env))
    assert counts["sent"] == 1 and counts["failed"] == counts["uncertain"] == 0
    assert counts["pending"] + counts["deferred"] == 5
    assert server.delivered() == {everyone[0]: 1}
    with RogueServer(tls=cert, auth=(USER, PASSWORD), port=port) as back:  # the server is back
        again = run_cli("send", EXAMPLE, env=env)
    assert again.returncode == 0, again.stderr
    assert back.delivered() == {a: 1 for a in everyone[1:]}
    assert ledger(config_for(env))["sent"] == 6


def test_a_wrong_port_fails_fast_at_the_first_connection(tmp_path):
    env = settings_env(tmp_path, free_port(), smtp_security="none")  # nothing listens there
    subscribe(config_for(env), addresses(2))
    result = run_cli("send", EXAMPLE, env=env)
    assert result.returncode == 2 and "cannot connect" in result.stderr
    assert ledger(config_for(env))["pending"] == 2


def test_connection_refused_is_unreachable_not_the_senders_fault(tmp_path):
    settings = config_for(settings_env(tmp_path, free_port(), smtp_security="none")).smtp
    with pytest.raises(ServerUnreachable, match="cannot connect"):
        asyncio.run(SmtpConnection.open(settings))


@pytest.mark.parametrize("greeting", [b"554 5.7.1 You are not welcome here\r\n", b"421 4.7.0 busy\r\n"])
def test_a_refusal_at_the_greeting_stops_the_run_and_a_421_only_defers(tmp_path, greeting):
    with RogueServer(hook=lambda n, verb: greeting if verb == "GREETING" and n == 1 else None) as server:
        env = settings_env(tmp_path, server.port, smtp_security="none", smtp_username="",
                           smtp_connections=2)
        del env["NEWSLETTER_SMTP_USERNAME"], env["NEWSLETTER_SMTP_PASSWORD"]
        subscribe(config_for(env), addresses(4))
        result = run_cli("send", EXAMPLE, env=env)
    if greeting.startswith(b"554"):  # the first connection is refused for good: everyone pending
        assert result.returncode == 2 and "the server will not talk: 554 5.7.1" in result.stderr
        assert ledger(config_for(env))["pending"] == 4 and server.delivered() == {}
    else:  # the first connection fails fast too (a wrong host looks the same): pending, exit 2
        assert result.returncode == 2 and "421 4.7.0 busy" in result.stderr
        assert ledger(config_for(env))["pending"] == 4


# -- 3. HELO when EHLO is refused; replies that are not SMTP --------------------------------------

def test_helo_when_ehlo_is_refused(tmp_path):
    refuse = lambda n, verb: b"502 5.5.2 Error: command not recognized\r\n" if verb == "EHLO" else None  # noqa
    with RogueServer(hook=refuse) as server:
        env = settings_env(tmp_path, server.port, smtp_security="none")
        del env["NEWSLETTER_SMTP_USERNAME"], env["NEWSLETTER_SMTP_PASSWORD"]
        subscribe(config_for(env), addresses(3))
        assert send_issue(EXAMPLE, config_for(env)).counts["sent"] == 3
        assert server.delivered() == {a: 1 for a in addresses(3)}
        commands = server.sessions[0].commands
        assert commands[0].startswith("EHLO ") and commands[1].startswith("HELO ")
        # no PIPELINING after HELO: one command at a time, so each MAIL was answered before RCPT
        assert [c.split(":")[0] for c in commands[2:5]] == ["MAIL FROM", "RCPT TO", "DATA"]


def test_helo_has_no_starttls_so_starttls_security_stops(tmp_path, cert):
    refuse = lambda n, verb: b"500 5.5.1 What?\r\n" if verb == "EHLO" else None  # noqa
    with RogueServer(tls=cert, hook=refuse) as server:
        config = config_for(settings_env(tmp_path, server.port, cert))
        subscribe(config, addresses(2))
        with pytest.raises(SendError, match=r"does not offer STARTTLS \(it refused EHLO: 500 5.5.1 What\?"):
            send_issue(EXAMPLE, config)
        assert ledger(config)["pending"] == 2 and "STARTTLS" not in server.commands()


GARBAGE = {
    "long-line": ("GREETING", b"220 " + b"x" * 3000 + b"\r\n", "a reply line of 3006 bytes (at most 2048)"),
    "endless-line": ("GREETING", b"220 " + b"x" * 200_000, "a reply line longer than 2048 bytes"),
    "not-a-reply": ("GREETING", b"HTTP/1.1 400 Bad Request\r\n", "not an SMTP reply"),
    "no-separator": ("GREETING", b"2200 hello\r\n", "not an SMTP reply"),
    "binary": ("GREETING", b"220 \xff\xfe\x00\x01garbage\r\n", "a reply that is not text"),
    "control-chars": ("GREETING", b"220 hello\x1b[31m\r\n", "a reply with control characters"),
    "codes-differ": ("EHLO", b"250-rogue.test\r\n251 PIPELINING\r\n", "a multiline reply whose codes differ"),
}


@pytest.mark.parametrize("case", GARBAGE, ids=list(GARBAGE))
def test_a_reply_that_is_not_smtp_is_a_protocol_error(tmp_path, case):
    verb, reply, expected = GARBAGE[case]
    with RogueServer(hook=lambda n, v: reply if v == verb else None) as server:
        env = settings_env(tmp_path, server.port, smtp_security="none", smtp_timeout=5)
        del env["NEWSLETTER_SMTP_USERNAME"], env["NEWSLETTER_SMTP_PASSWORD"]
        config = config_for(env)
        subscribe(config, addresses(2))
        with pytest.raises(SendError, match="protocol error: " + re.escape(expected)):
            send_issue(EXAMPLE, config)
        assert ledger(config)["pending"] == 2 and server.delivered() == {}
        if case == "binary":  # and as the user sees it: a sentence, exit 2, no traceback
            result = run_cli("send", EXAMPLE, env=env)
            assert result.returncode == 2 and "protocol error: a reply that is not text" in result.stderr


def test_a_garbled_reply_mid_send_drops_that_connection_only(tmp_path):
    # A reply to MAIL that is not SMTP: that connection is unusable, the message is tried on a new one.
    garble = lambda n, verb: b"25O 0k\r\n" if verb == "MAIL" and n == 1 else None  # noqa
    with RogueServer(hook=garble) as server:
        env = settings_env(tmp_path, server.port, smtp_security="none", smtp_connections=1)
        del env["NEWSLETTER_SMTP_USERNAME"], env["NEWSLETTER_SMTP_PASSWORD"]
        subscribe(config_for(env), addresses(3))
        summary = send_issue(EXAMPLE, config_for(env))
    assert summary.counts["sent"] == 3 and server.delivered() == {a: 1 for a in addresses(3)}
    assert len(server.sessions) == 2


# -- 5. the EHLO name ------------------------------------------------------------------------------

@pytest.mark.parametrize("machine", ["localhost", "localhost.localdomain", "buildbox", "", "LOCALHOST.example"])
def test_a_machine_called_localhost_greets_only_loopback(machine):
    with pytest.raises(SendError, match=r"this machine calls itself .*set smtp.helo_name"):
        ehlo_name(None, "203.0.113.7", "smtp mail.example.com:587", machine=machine)
    for peer in ("127.0.0.1", "127.0.0.53", "::1"):
        assert ehlo_name(None, peer, machine=machine) == (machine or "localhost")
    assert ehlo_name("news.example.com", "203.0.113.7", machine=machine) == "news.example.com"


def test_a_machine_with_a_proper_name_greets_with_it():
    assert ehlo_name(None, "203.0.113.7", machine="mx1.example.org") == "mx1.example.org"
    assert ehlo_name(None, "203.0.113.7", machine="192.0.2.4") == "[192.0.2.4]"
    assert ehlo_name(None, "203.0.113.7", machine="2001:db8::1") == "[IPv6:2001:db8::1]"


def test_the_configured_helo_name_is_what_the_server_hears(tmp_path):
    with RogueServer() as server:
        env = settings_env(tmp_path, server.port, smtp_security="none", smtp_helo_name="news.example.com")
        del env["NEWSLETTER_SMTP_USERNAME"], env["NEWSLETTER_SMTP_PASSWORD"]
        subscribe(config_for(env), addresses(1))
        send_issue(EXAMPLE, config_for(env))
    assert server.sessions[0].commands[0] == "EHLO news.example.com"


# -- 4. verify_tls = false is said on every run ----------------------------------------------------

def test_verify_tls_false_is_warned_on_every_run(tmp_path, cert):
    with Server(Handler(), tls=cert) as server:
        env = settings_env(tmp_path, server.port, None, smtp_verify_tls="false")
        subscribe(config_for(env), addresses(2))
        summary = send_issue(EXAMPLE, config_for(env))
        assert summary.counts["sent"] == 2
        assert any("smtp.verify_tls is false" in w for w in summary.warnings)
        result = run_cli("send", EXAMPLE, env=env)  # nothing left to send: still said
        assert result.returncode == 0 and "warning: smtp.verify_tls is false" in result.stderr
        checked = send_issue(EXAMPLE, config_for({**env, "NEWSLETTER_SMTP_CA_FILE": str(cert[0]),
                                                  "NEWSLETTER_SMTP_VERIFY_TLS": "true"}))
        assert not any("verify_tls" in w for w in checked.warnings)


# -- dot-stuffing --------------------------------------------------------------------------------

def test_a_message_that_needs_dot_stuffing_arrives_whole(tmp_path, cert, example):
    """Our messages never need it (tests/test_bodies.py checks that no line starts with "."),
    so they skip the scan; anything else is stuffed, and the server unstuffs it to the byte."""
    from newsletter.message import MessageFactory
    from newsletter.tokens import Signer

    config = config_for(settings_env(tmp_path, 1))
    message = MessageFactory(example, config, Signer(b"s", "l")).build("r0@example.com", None, "k" * 22)
    assert not message.needs_dot_stuffing and not re.search(rb"(^|\r\n)\.", message.data)

    class Foreign:  # a message from elsewhere, with lines that start with dots
        sender, recipient, needs_dot_stuffing = message.sender, "r1@example.com", True
        data = b"Subject: dots\r\n\r\n.first\r\n..second\r\n.\r\nlast"

    handler = Handler()
    with Server(handler, tls=cert) as server:
        settings = config_for(settings_env(tmp_path, server.port, cert)).smtp

        async def send():
            conn = await SmtpConnection.open(settings)
            try:
                return [await conn.send(message), await conn.send(Foreign)]
            finally:
                await conn.quit()

        outcomes = asyncio.run(send())
    assert [o.state for o in outcomes] == ["sent", "sent"]
    received = {r.recipient: r.data for r in handler.received}
    assert received["r0@example.com"] == message.data
    assert received["r1@example.com"] == Foreign.data + b"\r\n"  # the server ends the last line


# -- the ledger's gate: nothing is delivered before the ledger says `sending` -------------------------

def _one_message(tmp_path, example):
    from newsletter.message import MessageFactory
    from newsletter.tokens import Signer
    return MessageFactory(example, config_for(settings_env(tmp_path, 1)), Signer(b"s", "l")).build(
        "r0@example.com", None, "k" * 22)


def test_the_final_dot_waits_for_the_ledgers_commit(tmp_path, cert, example):
    """The envelope and the content go out while the ledger's commit is on its way; the
    "." that makes the server take the message waits for it (sender._Run)."""
    message = _one_message(tmp_path, example)
    handler = Handler()
    with Server(handler, tls=cert) as server:
        settings = config_for(settings_env(tmp_path, server.port, cert)).smtp

        async def send():
            conn = await SmtpConnection.open(settings)
            ready = asyncio.get_running_loop().create_future()
            try:
                sending = asyncio.create_task(conn.send(message, ready))
                await asyncio.sleep(0.3)  # the content is on the wire by now
                assert not sending.done() and handler.received == []
                ready.set_result(None)
                return await sending
            finally:
                await conn.quit()

        outcome = asyncio.run(send())
    assert outcome.state == "sent"
    assert [(r.recipient, r.data) for r in handler.received] == [("r0@example.com", message.data)]


def test_a_failed_commit_drops_the_message_before_its_final_dot(tmp_path, cert, example):
    """The ledger could not say `sending`: the connection is dropped without the ".", so
    the server throws the message away, and the ledger's error stops the send."""
    from newsletter.backends.smtp import SmtpWorker
    from newsletter.errors import StoreError
    message = _one_message(tmp_path, example)
    handler = Handler()
    with Server(handler, tls=cert) as server:
        settings = config_for(settings_env(tmp_path, server.port, cert)).smtp

        async def send():
            worker = SmtpWorker(settings)
            ready = asyncio.get_running_loop().create_future()
            sending = asyncio.create_task(worker.send_batch([message], ready))
            await asyncio.sleep(0.3)
            ready.set_exception(StoreError("postgresql://db: the store failed: connection lost"))
            try:
                with pytest.raises(StoreError, match="connection lost"):
                    await sending
                assert worker.conn is None  # dropped; the next message opens a new one
                return await worker.send_batch([message])  # the same message, with no gate: delivered
            finally:
                await worker.close()

        outcomes = asyncio.run(send())
    assert [o.state for o in outcomes] == ["sent"]
    assert [r.recipient for r in handler.received] == ["r0@example.com"]  # once: the dropped one never arrived


# -- the next envelope behind the "." (RFC 2920 4) ------------------------------------------------

def test_the_next_messages_envelope_goes_out_behind_the_final_dot(tmp_path, example):
    """A server that answers a "." only once it has read what the client sent with it sees
    the next message's MAIL, RCPT and DATA already there: one round trip a message."""
    factory_message = _one_message(tmp_path, example)
    seen_with_dot: list[bytes] = []

    async def serve(reader, writer):
        async def reply(line):
            writer.write(line + b"\r\n")
            await writer.drain()
        await reply(b"220 test ESMTP")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                await reply(b"250-test\r\n250 PIPELINING")
            elif verb in (b"MAIL", b"RCPT", b"RSET"):
                await reply(b"250 ok")
            elif verb == b"DATA":
                await reply(b"354 go on")
                while (content := await reader.readline()) != b".\r\n":
                    assert content
                try:  # whatever came with the "." (the client does not wait for our reply)
                    seen_with_dot.append(await asyncio.wait_for(reader.readuntil(b"DATA\r\n"), 2))
                except asyncio.TimeoutError:
                    seen_with_dot.append(b"")
                    await reply(b"250 queued")
                    continue
                await reply(b"250 queued")
                for _ in range(3):  # the early envelope's MAIL, RCPT and DATA
                    await reply(b"250 ok" if _ < 2 else b"354 go on")
                while (content := await reader.readline()) != b".\r\n":
                    assert content
                await reply(b"250 queued")
            elif verb == b"QUIT":
                await reply(b"221 bye")
                break

    class Second:
        sender, recipient, needs_dot_stuffing = factory_message.sender, "r1@example.com", False
        data = b"Subject: two\r\n\r\nsecond\r\n"

    async def run():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        env = settings_env(tmp_path, port, smtp_security="none")
        del env["NEWSLETTER_SMTP_USERNAME"], env["NEWSLETTER_SMTP_PASSWORD"]
        settings = config_for(env).smtp
        try:
            conn = await SmtpConnection.open(settings)
            first = await conn.send(factory_message, after=Second)
            second = await conn.send(Second)
            await conn.quit()
            return first, second
        finally:
            server.close()

    first, second = asyncio.run(run())
    assert (first.state, second.state) == ("sent", "sent")
    assert seen_with_dot == [b"MAIL FROM:<%s>\r\nRCPT TO:<r1@example.com>\r\nDATA\r\n" % Second.sender.encode()]


def test_an_early_envelope_never_delivers_a_message_that_is_not_sent(tmp_path, cert, example):
    """The run stopped after the "." that carried the next envelope: closing the connection
    drops it (a QUIT there would be read as content), and nothing more is delivered. A
    refusal of an early envelope fails that message alone."""
    from newsletter.backends.smtp import SmtpWorker
    message = _one_message(tmp_path, example)

    class Other:
        sender, needs_dot_stuffing = message.sender, False
        data = b"Subject: other\r\n\r\nother\r\n"

        def __init__(self, recipient):
            self.recipient = recipient

    handler = Handler(script={"gone@example.com": ["550 5.1.1 no such user"]})
    with Server(handler, tls=cert) as server:
        settings = config_for(settings_env(tmp_path, server.port, cert)).smtp

        async def run():
            worker = SmtpWorker(settings)
            try:
                never, gone, last = Other("never@example.com"), Other("gone@example.com"), Other("last@example.com")
                outcomes = await worker.send_batch([message], after=never)
                assert worker.conn.early is never
                outcomes += await worker.send_batch([gone], after=last)  # not `never`: a new connection
                outcomes += await worker.send_batch([last], after=Other("unsent@example.com"))
                return outcomes
            finally:
                await worker.close()

        outcomes = asyncio.run(run())
        time.sleep(0.2)  # the server sees the connections close
    assert [(o.state, o.fault) for o in outcomes] == [("sent", None), ("failed", "recipient"), ("sent", None)]
    assert [r.recipient for r in handler.received] == ["r0@example.com", "last@example.com"]


# -- from the review of the ledger's gate and the early envelope: each failed before its fix ----------

def test_a_commit_that_failed_before_the_354_drops_the_connection_and_never_quits_in_data(tmp_path, example):
    """The ledger's commit had failed already when the server said 354 (a slow server, or an
    early envelope's replies read after the commit's error came back): the connection is
    dropped there, as when the commit fails later. Kept, it was left in DATA mode, and
    closing it sent QUIT, which the server reads as the message's content."""
    from newsletter.backends.smtp import SmtpWorker
    from newsletter.errors import StoreError
    message = _one_message(tmp_path, example)
    in_data: list[bytes] = []  # what the server read in DATA mode of a message that never ended

    async def run():
        ended = asyncio.Event()

        async def serve(reader, writer):
            async def reply(line):
                writer.write(line + b"\r\n")
                await writer.drain()
            await reply(b"220 test ESMTP")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    await reply(b"250-test\r\n250 PIPELINING")
                elif verb in (b"MAIL", b"RCPT", b"RSET"):
                    await reply(b"250 ok")
                elif verb == b"DATA":
                    await reply(b"354 go on")
                    content = b""
                    while (chunk := await reader.readline()) not in (b".\r\n", b""):
                        content += chunk
                    if not chunk:  # the client went away in the middle: nothing delivered
                        in_data.append(content)
                        break
                    await reply(b"250 queued")
                elif verb == b"QUIT":
                    await reply(b"221 bye")
                    break
            ended.set()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        env = settings_env(tmp_path, server.sockets[0].getsockname()[1], smtp_security="none")
        del env["NEWSLETTER_SMTP_USERNAME"], env["NEWSLETTER_SMTP_PASSWORD"]
        worker = SmtpWorker(config_for(env).smtp)
        ready = asyncio.get_running_loop().create_future()
        ready.set_exception(StoreError("postgresql://db: the store failed: connection lost"))
        ready.exception()
        try:
            with pytest.raises(StoreError, match="connection lost"):
                await worker.send_batch([message], ready)
            dropped = worker.conn is None
        finally:
            await worker.close()
            await asyncio.wait_for(ended.wait(), 10)
            server.close()
        return dropped

    dropped = asyncio.run(run())
    assert in_data == [b""]  # nothing after the 354: no content, no ".", no QUIT
    assert dropped


def test_a_connection_that_could_not_reconnect_hands_its_next_message_to_the_others(tmp_path, monkeypatch):
    """smtp.py: when a connection cannot get through, only its message is deferred, and it
    waits before it takes more while the others go on. The next message it had taken for
    its early envelope goes to another connection, not out at once on a new connection of
    its own (which the server refused too: a second message deferred for nothing)."""
    from newsletter.backends.smtp import SmtpWorker
    monkeypatch.setattr(SmtpWorker, "BACKOFF_FIRST", 2.0)  # the healthy connection sends the rest meanwhile

    def hook(n, verb):
        if n == 1 and verb == "MAIL":
            return "drop"  # the first connection's first message: lost before its content
        if n >= 3 and verb == "GREETING":
            return b"421 4.3.2 Too busy, try later\r\n"  # and no new connection gets through
        return None

    with RogueServer(hook=hook) as server:
        env = settings_env(tmp_path, server.port, smtp_security="none", smtp_connections=2,
                           send_retry_delay=600, send_max_wait=0)
        del env["NEWSLETTER_SMTP_USERNAME"], env["NEWSLETTER_SMTP_PASSWORD"]
        config = config_for(env)
        everyone = addresses(6)
        subscribe(config, everyone)
        summary = send_issue(EXAMPLE, config)
    assert summary.counts["deferred"] == 1 and summary.counts["sent"] == 5, summary.counts
    assert len(server.sessions) == 3  # two, and the one reconnection that was refused
    assert sum(server.delivered().values()) == 5


def test_bytes_that_arrive_while_the_handshake_waits_its_turn_are_refused_too(tmp_path, cert, monkeypatch):
    # The check before start_tls sees only what had arrived by then. On a busy event loop
    # (other connections, messages being built) start_tls runs a while later, and an
    # injection in a packet of its own lands in the reader meanwhile: it must not pass for
    # the server's EHLO answer inside TLS either.
    injected = b"250-evil\r\n250 AUTH PLAIN\r\n"
    start_tls = asyncio.StreamWriter.start_tls

    async def busy_loop_then_start_tls(self, *args, **kwargs):
        await asyncio.sleep(0.5)
        return await start_tls(self, *args, **kwargs)

    monkeypatch.setattr(asyncio.StreamWriter, "start_tls", busy_loop_then_start_tls)
    with RogueServer(tls=cert, auth=(USER, PASSWORD),
                     hook=lambda n, verb: ("later", 0.1, injected) if verb == "STARTTLS" else None) as server:
        config = config_for(settings_env(tmp_path, server.port, cert))
        subscribe(config, addresses(2))
        with pytest.raises(SendError, match="possible tampering; refusing"):
            send_issue(EXAMPLE, config)
        assert ledger(config)["pending"] == 2
        assert server.delivered() == {}


def test_a_full_mailbox_refused_at_data_fails_that_reader_and_the_run_goes_on(tmp_path, cert):
    # Some servers check the quota only once the content is in: "552 5.2.2" at the end of
    # DATA names this reader's mailbox, not the message. Taken as the message's fault, the run
    # stopped there, and every later run stopped at the same reader, first in line again.
    refusals = []

    def hook(n, verb):
        if verb == "DATA" and not refusals:
            refusals.append(n)
            return b"552 5.2.2 <r0@example.com>: mailbox full\r\n"
        return None

    with RogueServer(tls=cert, auth=(USER, PASSWORD), hook=hook) as server:
        config = config_for(settings_env(tmp_path, server.port, cert, smtp_connections=1))
        subscribe(config, addresses(3))
        summary = send_issue(EXAMPLE, config)
        assert summary.refused is None, summary.refused
        assert summary.counts["sent"] == 2 and summary.counts["failed"] == 1 and summary.counts["pending"] == 0
        with Store(config.store.path) as store:
            assert not any(store.suppressed(a) for a in addresses(3))  # failed, never suppressed from DATA
