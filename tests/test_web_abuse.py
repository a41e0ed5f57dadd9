"""`newsletter serve` (its own process) fed abuse at every route of its table: bodies over the
limit (declared, and chunked with no length), wrong content types, bodies and paths that are
not UTF-8, headers too large, garbage methods, forged tokens and webhook signatures
(bit-flipped, wrong key, expired, another list), and slow clients. Each answer is a 4xx
(never a 5xx), the store is unchanged (every table, every row), and /health still answers a
fresh client while the slow ones hang, and afterwards.

The cases are made from app.routes(): a route added there is fed the same abuse."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import sqlite3
import struct
import time

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import addresses, config_for, subscribe
from newsletter.store import Store
from newsletter.tokens import Signer
from newsletter.web.app import routes
from newsletter.web.signup import make_token
from test_send import settings_env
from test_serve import Service

MAX_BODY = 2048
LIST_ID = "the-watchman.example.com"
WEBHOOK_SECRETS = {"mailgun": "mailgun-signing-key-for-abuse", "resend": b"resend-signing-key-for-abuse",
                   "postmark": ("hook", "postmark-hook-password")}
SENDGRID_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())

# (method, path) for every route; {token} is filled by each case
ENDPOINTS = sorted({(m, r.path) for r in routes(None) for m in r.methods if m != "HEAD"})


def endpoint_id(endpoint) -> str:
    return f"{endpoint[0]} {endpoint[1]}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("abuse")
    public = SENDGRID_KEY.public_key().public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    env = settings_env(tmp, 1, serve_max_body=MAX_BODY, webhooks_max_body=MAX_BODY,
                       send_backend="outbox", signup_enabled="true", serve_public_url="https://news.example.com",
                       signup_address_limit=0, signup_client_limit=0, serve_read_timeout=2,
                       webhooks_mailgun_signing_key=WEBHOOK_SECRETS["mailgun"],
                       webhooks_resend_secret="whsec_" + base64.b64encode(WEBHOOK_SECRETS["resend"]).decode(),
                       webhooks_postmark_username=WEBHOOK_SECRETS["postmark"][0],
                       webhooks_postmark_password=WEBHOOK_SECRETS["postmark"][1],
                       webhooks_sendgrid_public_key=base64.b64encode(public).decode(),
                       webhooks_ses_enabled="true", webhooks_sns_cert_host=r"localhost")
    config = config_for(env)
    assert sorted({(m, r.path) for r in routes(config) for m in r.methods if m != "HEAD"}) == ENDPOINTS
    subscribe(config, addresses(5))
    signer = Signer(config.send.secret.encode(), config.publication.list_id)
    with Store(config.store.path) as store:
        store.enqueue_subscribers("2021-08-13-china-taliban", signer.recipient_key)
    service = Service(env, tmp)
    yield service, config, signer
    log = service.stop()
    assert "Traceback" not in log, log


def dump(config) -> dict:
    db = sqlite3.connect(f"file:{config.store.path}?mode=ro", uri=True)
    try:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(map(repr, db.execute(f"SELECT * FROM {t}"))) for t in tables}
    finally:
        db.close()


def exchange(port: int, data: bytes, timeout: float = 30) -> tuple[int, bytes]:
    """Send these bytes as they are; the status and body of the answer (0: none, the
    connection was closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (413) and closed: read what it said
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    if not answer.startswith(b"HTTP/1.1 "):
        return 0, answer
    return int(answer[9:12]), answer.split(b"\r\n\r\n", 1)[-1]


def request(method: bytes, target: bytes, headers: dict[bytes, bytes] | None = None, body: bytes = b"",
            length: bool = True) -> bytes:
    head = {b"Host": b"127.0.0.1", b"Connection": b"close", **(headers or {})}
    if length and body and b"Transfer-Encoding" not in head:
        head[b"Content-Length"] = str(len(body)).encode()
    return method + b" " + target + b" HTTP/1.1\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in head.items()) \
        + b"\r\n" + body


def chunked(body: bytes, size: int = 500) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


def target(path: str, token: str = "AAAA") -> bytes:
    return path.replace("{token}", token).encode()


# -- the abuse every route gets -------------------------------------------------------------------

FORM = b"application/x-www-form-urlencoded"
GENERIC = {
    "oversized-declared": lambda m, p: request(m, target(p), {b"Content-Type": FORM,
                                                              b"Content-Length": str(MAX_BODY * 50).encode()}, b"a=b",
                                               length=False),
    "oversized-chunked": lambda m, p: request(m, target(p), {b"Content-Type": FORM, b"Transfer-Encoding": b"chunked"},
                                              chunked(b"a=" + b"x" * MAX_BODY * 4)),
    "content-length-not-a-number": lambda m, p: request(m, target(p), {b"Content-Length": b"12abc"}, b"a=b",
                                                        length=False),
    "wrong-content-type": lambda m, p: request(m, target(p), {b"Content-Type": b"application/x-shockwave-flash"},
                                               b"\x00\x01garbage"),
    "xml-body": lambda m, p: request(m, target(p), {b"Content-Type": b"application/xml"},
                                     b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaa'>]><x>&a;</x>"),
    "non-utf8-form": lambda m, p: request(m, target(p), {b"Content-Type": FORM},
                                          b"List-Unsubscribe=\xff\xfe\x80&email=\xc3\x28@example.com"),
    "non-utf8-json": lambda m, p: request(m, target(p), {b"Content-Type": b"application/json"},
                                          b'{"email": "\xff\xfe@example.com", "events": "\xc3\x28"}'),
    "truncated-json": lambda m, p: request(m, target(p), {b"Content-Type": b"application/json"},
                                           b'[{"event": "bounce", "email": "r1@exa'),
    "json-not-an-object": lambda m, p: request(m, target(p), {b"Content-Type": b"application/json"}, b"12345"),
    "multipart-without-boundary": lambda m, p: request(m, target(p), {b"Content-Type": b"multipart/form-data"},
                                                       b"--x\r\n\r\nList-Unsubscribe=One-Click"),
    "non-utf8-path": lambda m, p: request(m, target(p, "%FF%FE%C3%28") + b"/\xff\xfe", {}),
    "huge-header": lambda m, p: request(m, target(p), {b"X-Big": b"a" * 200_000}),
    "many-headers": lambda m, p: request(m, target(p), {b"X-H%d" % i: b"v" for i in range(4000)}),
    "garbage-method": lambda m, p: request(b"FROB", target(p), {}),
    "control-in-method": lambda m, p: request(b"G\x01T", target(p), {}),
    "absolute-garbage": lambda m, p: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
}
# a GET that carries junk it ignores may answer 200 (the page): only "never 5xx" holds there
HARMLESS_FOR_GET = {"oversized-chunked", "wrong-content-type", "xml-body", "non-utf8-form", "non-utf8-json", "truncated-json",
                    "json-not-an-object", "multipart-without-boundary", "content-length-not-a-number"}


def _abuse_cases():
    for endpoint in ENDPOINTS:
        for case in GENERIC:
            yield pytest.param(endpoint, case, id=f"{endpoint_id(endpoint)}-{case}")


@pytest.mark.parametrize("endpoint,case", list(_abuse_cases()))
def test_every_route_answers_abuse_with_a_4xx_and_changes_nothing(world, endpoint, case):
    service, config, _ = world
    method, path = endpoint
    before = dump(config)
    status, body = exchange(service.port, GENERIC[case](method.encode(), path))
    safe_get = method == "GET" and "{token}" not in path and case in HARMLESS_FOR_GET
    if safe_get:
        assert 0 < status < 500, (status, body[:300])
    else:
        assert 400 <= status < 500, (status, body[:300])
    assert b"Traceback" not in body
    assert dump(config) == before
    assert exchange(service.port, request(b"GET", b"/health"))[0] == 200


# -- forged tokens --------------------------------------------------------------------------------

def _flip(token: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[len(raw) // 2] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")


def forged_tokens(config, signer: Signer, path: str) -> dict[str, str]:
    secret = config.send.secret.encode()
    if "confirm" in path:
        good = make_token(secret, config.publication.list_id, "new@example.com", "New", int(time.time()) + 3600)
        return {"bit-flipped": _flip(good), "truncated": good[: len(good) // 2],
                "wrong-key": make_token(b"another secret", config.publication.list_id, "new@example.com", None,
                                        int(time.time()) + 3600),
                "other-list": make_token(secret, "other.example.org", "new@example.com", None, int(time.time()) + 3600),
                "expired": make_token(secret, config.publication.list_id, "new@example.com", None, int(time.time()) - 60),
                "empty-payload": base64.urlsafe_b64encode(b"\x01" + struct.pack(">Q", 2**40)).decode().rstrip("="),
                "not-base64": "!!!***$$$", "huge": "A" * 6000}
    good = signer.token(signer.recipient_key("r1@example.com"))
    return {"bit-flipped": _flip(good), "truncated": good[: len(good) // 2], "extended": good + "AAAA",
            "wrong-key": Signer(b"another secret", config.publication.list_id).token(signer.recipient_key("r1@example.com")),
            "other-list": Signer(config.send.secret.encode(), "other.example.org").token(
                signer.recipient_key("r1@example.com")),
            "unknown-reader": signer.token(signer.recipient_key("nobody@example.com")),
            "not-base64": "!!!***$$$", "huge": "A" * 6000}


TOKEN_ENDPOINTS = [e for e in ENDPOINTS if "{token}" in e[1]]


@pytest.mark.parametrize("endpoint", TOKEN_ENDPOINTS, ids=endpoint_id)
def test_forged_tokens_are_refused_with_a_4xx_and_change_nothing(world, endpoint):
    service, config, signer = world
    method, path = endpoint
    before = dump(config)
    for name, token in forged_tokens(config, signer, path).items():
        body = b"List-Unsubscribe=One-Click" if method == "POST" else b""
        status, answer = exchange(service.port, request(method.encode(), target(path, token),
                                                        {b"Content-Type": FORM} if body else {}, body))
        assert 400 <= status < 500, (name, status, answer[:300])
    assert dump(config) == before


# -- forged webhook signatures --------------------------------------------------------------------

def _mailgun(key: str, stamp: int, flip: bool = False) -> bytes:
    token = "t" * 50
    signature = hmac.new(key.encode(), f"{stamp}{token}".encode(), hashlib.sha256).hexdigest()
    if flip:
        signature = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    body = json.dumps({"signature": {"timestamp": str(stamp), "token": token, "signature": signature},
                       "event-data": {"event": "failed", "severity": "permanent", "recipient": "r1@example.com",
                                      "id": f"ev-{stamp}-{flip}", "delivery-status": {"code": 550}}}).encode()
    return request(b"POST", b"/webhooks/mailgun", {b"Content-Type": b"application/json"}, body)


def _resend(key: bytes, stamp: int, flip: bool = False) -> bytes:
    body = json.dumps({"type": "email.bounced", "created_at": "2024-01-01T00:00:00Z",
                       "data": {"to": ["r1@example.com"], "bounce": {"type": "Permanent"}}}).encode()
    signed = hmac.new(key, b"msg_1." + str(stamp).encode() + b"." + body, hashlib.sha256).digest()
    if flip:
        signed = bytes([signed[0] ^ 1]) + signed[1:]
    return request(b"POST", b"/webhooks/resend", {
        b"Content-Type": b"application/json", b"svix-id": b"msg_1", b"svix-timestamp": str(stamp).encode(),
        b"svix-signature": b"v1," + base64.b64encode(signed)}, body)


def _sendgrid(key, stamp: int, flip: bool = False) -> bytes:
    body = json.dumps([{"email": "r1@example.com", "event": "bounce", "type": "bounce", "status": "5.1.1",
                        "sg_event_id": f"sg-{stamp}", "timestamp": stamp}]).encode()
    signature = bytearray(key.sign(str(stamp).encode() + body, ec.ECDSA(hashes.SHA256())))
    if flip:
        signature[-1] ^= 1
    return request(b"POST", b"/webhooks/sendgrid", {
        b"Content-Type": b"application/json",
        b"X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(bytes(signature)),
        b"X-Twilio-Email-Event-Webhook-Timestamp": str(stamp).encode()}, body)


def _postmark(user: str, password: str) -> bytes:
    body = json.dumps({"RecordType": "Bounce", "Type": "HardBounce", "Email": "r1@example.com", "ID": 42}).encode()
    return request(b"POST", b"/webhooks/postmark", {
        b"Content-Type": b"application/json",
        b"Authorization": b"Basic " + base64.b64encode(f"{user}:{password}".encode())}, body)


def _ses(cert_url: str, signature: str = "AAAA") -> bytes:
    message = {"Type": "Notification", "MessageId": "m-1", "TopicArn": "arn:aws:sns:us-east-1:1:ses",
               "Message": json.dumps({"notificationType": "Bounce", "bounce": {
                   "bounceType": "Permanent", "bouncedRecipients": [{"emailAddress": "r1@example.com"}]}}),
               "Timestamp": "2024-01-01T00:00:00.000Z", "SignatureVersion": "2", "Signature": signature,
               "SigningCertURL": cert_url}
    return request(b"POST", b"/webhooks/ses", {b"Content-Type": b"text/plain; charset=UTF-8",
                                               b"x-amz-sns-message-type": b"Notification"},
                   json.dumps(message).encode())


def forged_webhooks() -> dict[str, bytes]:
    now, old = int(time.time()), int(time.time()) - 3 * 3600
    mg, rs, (pm_user, pm_password) = WEBHOOK_SECRETS["mailgun"], WEBHOOK_SECRETS["resend"], WEBHOOK_SECRETS["postmark"]
    return {
        "mailgun-bit-flipped": _mailgun(mg, now, flip=True), "mailgun-wrong-key": _mailgun("other-key", now),
        "mailgun-expired": _mailgun(mg, old), "mailgun-from-the-future": _mailgun(mg, now + 3 * 3600),
        "resend-bit-flipped": _resend(rs, now, flip=True), "resend-wrong-key": _resend(b"other-key", now),
        "resend-expired": _resend(rs, old),
        "sendgrid-bit-flipped": _sendgrid(SENDGRID_KEY, now, flip=True),
        "sendgrid-wrong-key": _sendgrid(OTHER_KEY, now),
        "postmark-wrong-password": _postmark(pm_user, pm_password + "x"), "postmark-wrong-user": _postmark("x", pm_password),
        "postmark-flipped-password": _postmark(pm_user, pm_password[:-1] + chr(ord(pm_password[-1]) ^ 1)),
        "ses-cert-elsewhere": _ses("https://evil.example.net/cert.pem"),
        "ses-cert-plain-http": _ses("http://localhost/cert.pem"),
        "ses-not-base64-signature": _ses("https://localhost:9/cert.pem", signature="!!!"),
    }


@pytest.mark.parametrize("name", sorted(forged_webhooks()))
def test_forged_webhooks_are_refused_with_a_4xx_and_change_nothing(world, name):
    service, config, _ = world
    before = dump(config)
    status, answer = exchange(service.port, forged_webhooks()[name])
    assert 400 <= status < 500, (status, answer[:300])
    assert dump(config) == before


def test_a_signing_certificate_that_cannot_be_fetched_is_a_502_and_changes_nothing(world):
    """The one 5xx on purpose: the certificate's host is SNS's (here: the allowed pattern) but
    it cannot be reached, which is no fault of the request; SNS retries a 5xx later."""
    service, config, _ = world
    before = dump(config)
    status, answer = exchange(service.port, _ses("https://localhost:9/cert.pem"))
    assert status == 502 and b"certificate" in answer, (status, answer[:300])
    assert dump(config) == before


def signer_token(config) -> str:
    signer = Signer(config.send.secret.encode(), config.publication.list_id)
    return signer.token(signer.recipient_key("r2@example.com"))


# -- slow clients ---------------------------------------------------------------------------------

def test_slow_clients_neither_block_others_nor_hold_on_forever(world):
    """One client sends its headers a byte at a time and stalls; another declares a body
    and stops half-way. A fresh client still gets /health meanwhile; the service closes
    both stalled connections in the end (the body one with a 408), and still answers."""
    service, config, _ = world
    before = dump(config)
    trickle = socket.create_connection(("127.0.0.1", service.port), timeout=60)
    for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: yes":
        trickle.send(bytes([byte]))
    bodies = []
    # the confirmation POST needs no body: a valid token would confirm at once, an invalid one
    # is refused at once (400); the others wait for the body
    tokens = {"confirm": "AAAA", "unsubscribe": signer_token(config)}
    for method, path in ENDPOINTS:
        if method != "POST":
            continue
        # a valid token: the handler reads the body before it can answer
        token = tokens["confirm" if "confirm" in path else "unsubscribe"]
        stalled = socket.create_connection(("127.0.0.1", service.port), timeout=60)
        stalled.sendall(request(b"POST", target(path, token), {b"Content-Type": FORM, b"Content-Length": b"1000"},
                                b"a=b", length=False))
        bodies.append((path, stalled))
    try:
        for _ in range(3):
            assert exchange(service.port, request(b"GET", b"/health"), timeout=10)[0] == 200
        for path, stalled in bodies:
            answer = b""
            while chunk := stalled.recv(65536):
                answer += chunk
            expected = b"HTTP/1.1 400" if "confirm" in path else b"HTTP/1.1 408"
            assert answer.startswith(expected), (path, answer[:200])
        # the header trickler is cut off too (no answer is owed to half a request)
        trickle.settimeout(60)
        assert trickle.recv(65536) == b""
    finally:
        trickle.close()
        for _, stalled in bodies:
            stalled.close()
    assert exchange(service.port, request(b"GET", b"/health"))[0] == 200
    assert dump(config) == before
