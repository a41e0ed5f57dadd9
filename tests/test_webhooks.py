"""Provider webhooks against the service run by uvicorn on loopback, with real HTTP: each
provider's valid, invalid and replayed requests, signed in the test with the algorithm the
provider documents, and what they did to the store."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import time
import uuid

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from conftest import addresses, config_for, require, store_of, subscribe
from test_send import settings_env
from webhook_service import Service, SnsStandIn, openssl_certificate

ISSUE = "2021-08-13-china-taliban"
MAILGUN_KEY = "mailgun-signing-key-for-tests"
POSTMARK = ("postmark-hook", "postmark-password-for-tests")
RESEND_KEY = b"resend-test-signing-key-32-bytes"
RESEND_SECRET = "whsec_" + base64.b64encode(RESEND_KEY).decode()
PEOPLE = addresses(8)

pytestmark = pytest.mark.usefixtures("store_backend")  # each test on SQLite and on PostgreSQL


def rkey(email: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(email.encode()).digest()[:16]).rstrip(b"=").decode()


def message_id(email: str) -> str:
    return f"{ISSUE}.0123456789.{rkey(email)}@example.com"


@pytest.fixture(scope="module")
def sendgrid_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def sns(tmp_path_factory):
    require("openssl", shutil.which("openssl") is not None)
    folder = tmp_path_factory.mktemp("sns")
    tls = openssl_certificate(folder, "tls", "/CN=localhost", "DNS:localhost,IP:127.0.0.1")
    signing = openssl_certificate(folder, "signing", "/CN=sns.test.amazonaws.com")
    key = serialization.load_pem_private_key(signing[1].read_bytes(), None)
    with SnsStandIn(*tls, signing[0]) as server:
        server.ca_file, server.key = tls[0], key
        yield server


def make_config(tmp_path, **webhooks):
    env = settings_env(tmp_path, 1)
    env.update({f"NEWSLETTER_WEBHOOKS_{k.upper()}": str(v) for k, v in webhooks.items()})
    config = config_for(env)
    subscribe(config, PEOPLE)
    with store_of(config) as store:
        for email in PEOPLE:
            store.db.execute("INSERT INTO deliveries (issue, email, rkey, state, updated_at) VALUES (?, ?, ?, 'sent', 't')",
                             (ISSUE, email, rkey(email)))
    return config


@pytest.fixture
def service(tmp_path, sendgrid_key, sns):
    public = sendgrid_key.public_key().public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    config = make_config(tmp_path, sendgrid_public_key=base64.b64encode(public).decode(),
                         mailgun_signing_key=MAILGUN_KEY, postmark_username=POSTMARK[0],
                         postmark_password=POSTMARK[1], resend_secret=RESEND_SECRET, ses_enabled="true",
                         sns_cert_host="localhost", sns_ca_file=sns.ca_file)
    with Service(config) as running, httpx.Client(base_url=running.url, timeout=20) as client:
        running.client, running.config = client, config
        yield running


def standing(config, email):
    """(subscriber status, suppressed, ledger state)"""
    with store_of(config) as store:
        status = store.db.execute("SELECT status FROM subscribers WHERE email = ?", (email,)).fetchone()[0]
        state = store.db.execute("SELECT state FROM deliveries WHERE email = ?", (email,)).fetchone()[0]
        return status, store.suppressed(email), state


def untouched(config):
    return all(standing(config, email) == ("subscribed", False, "sent") for email in PEOPLE)


def restore(config, email):
    with store_of(config) as store:
        store.restore([email])
        store.set_status(email, "subscribed", "test")


# -- SendGrid ---------------------------------------------------------------------------------

def sendgrid_post(service, key, events, body=None, timestamp=None):
    body = body if body is not None else json.dumps(events).encode()
    timestamp = timestamp or str(int(time.time()))
    signature = base64.b64encode(key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()
    return service.client.post("/webhooks/sendgrid", content=body, headers={
        "Content-Type": "application/json", "X-Twilio-Email-Event-Webhook-Signature": signature,
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp})


def sendgrid_event(event, email, **extra):
    return {"email": email, "event": event, "sg_event_id": uuid.uuid4().hex, "timestamp": int(time.time()),
            "message_id": message_id(email), **extra}


def test_sendgrid_signed_batch(service, sendgrid_key):
    r = PEOPLE
    events = [sendgrid_event("bounce", r[0], type="bounce", status="5.1.1", reason="550 5.1.1 no such user"),
              sendgrid_event("bounce", r[1], type="blocked", status="4.7.1", reason="try later"),
              sendgrid_event("spamreport", r[2]), sendgrid_event("unsubscribe", r[3]),
              sendgrid_event("group_unsubscribe", r[4], asm_group_id=7),
              sendgrid_event("dropped", r[5], reason="Bounced Address"),
              sendgrid_event("delivered", r[6]), sendgrid_event("open", r[7])]
    answer = sendgrid_post(service, sendgrid_key, events)
    assert (answer.status_code, answer.json()) == (200, {"events": 6, "changed": 5})
    config = service.config
    assert standing(config, r[0]) == ("bounced", True, "failed")
    assert standing(config, r[1]) == ("subscribed", False, "sent")  # soft: nothing
    assert standing(config, r[2]) == ("complained", True, "sent")
    assert standing(config, r[3]) == ("unsubscribed", False, "sent")
    assert standing(config, r[4]) == ("unsubscribed", False, "sent")
    assert standing(config, r[5]) == ("bounced", True, "failed")
    assert standing(config, r[6]) == standing(config, r[7]) == ("subscribed", False, "sent")
    with store_of(config) as store:
        reply = store.db.execute("SELECT reply FROM deliveries WHERE email = ?", (r[0],)).fetchone()[0]
    assert reply == "hard_bounce: sendgrid webhook: bounce: 5.1.1 550 5.1.1 no such user"

    restore(config, r[0])  # put back by hand: the replay must not bounce them again
    replay = sendgrid_post(service, sendgrid_key, events)
    assert (replay.status_code, replay.json()) == (200, {"events": 6, "changed": 0})
    assert standing(config, r[0])[:2] == ("subscribed", False)


def test_sendgrid_refuses_a_bad_signature_and_a_bad_body(service, sendgrid_key):
    body = json.dumps([sendgrid_event("bounce", PEOPLE[0], type="bounce")]).encode()
    timestamp = str(int(time.time()))
    good = base64.b64encode(sendgrid_key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()
    tampered = body.replace(PEOPLE[0].encode(), PEOPLE[1].encode())
    for content, headers in [
        (tampered, {"X-Twilio-Email-Event-Webhook-Signature": good, "X-Twilio-Email-Event-Webhook-Timestamp": timestamp}),
        (body, {"X-Twilio-Email-Event-Webhook-Signature": good, "X-Twilio-Email-Event-Webhook-Timestamp": "1"}),
        (body, {"X-Twilio-Email-Event-Webhook-Timestamp": timestamp}),
        (body, {"X-Twilio-Email-Event-Webhook-Signature": "not base64!", "X-Twilio-Email-Event-Webhook-Timestamp": timestamp}),
    ]:
        answer = service.client.post("/webhooks/sendgrid", content=content, headers=headers)
        assert answer.status_code == 401, answer.text
    other_key = ec.generate_private_key(ec.SECP256R1())
    assert sendgrid_post(service, other_key, [sendgrid_event("spamreport", PEOPLE[0])]).status_code == 401
    assert untouched(service.config)
    assert sendgrid_post(service, sendgrid_key, None, body=b"[{not json").status_code == 400
    assert sendgrid_post(service, sendgrid_key, [{"event": "bounce", "email": PEOPLE[0]}]).status_code == 400
    assert sendgrid_post(service, sendgrid_key, {"event": "bounce"}).status_code == 400
    assert untouched(service.config)


# -- Mailgun ----------------------------------------------------------------------------------

def mailgun_body(event_data, key=MAILGUN_KEY, timestamp=None, token=None):
    timestamp = timestamp or str(int(time.time()))
    token = token or uuid.uuid4().hex + uuid.uuid4().hex[:18]
    signature = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return {"signature": {"timestamp": timestamp, "token": token, "signature": signature}, "event-data": event_data}


def mailgun_event(event, email, **extra):
    return {"event": event, "id": uuid.uuid4().hex, "recipient": email, "timestamp": time.time(),
            "message": {"headers": {"message-id": message_id(email)}}, **extra}


def test_mailgun(service):
    config, post = service.config, lambda body: service.client.post("/webhooks/mailgun", json=body)
    failed = mailgun_event("failed", PEOPLE[0], severity="permanent",
                           **{"delivery-status": {"code": 550, "message": "5.1.1 no such user"}})
    body = mailgun_body(failed)
    answer = post(body)
    assert (answer.status_code, answer.json()) == (200, {"events": 1, "changed": 1})
    assert standing(config, PEOPLE[0]) == ("bounced", True, "failed")
    assert post(body).status_code == 401  # the same token again: a replayed request
    restore(config, PEOPLE[0])
    again = post(mailgun_body(failed))  # the same event, freshly signed: taken, changes nothing
    assert (again.status_code, again.json()) == (200, {"events": 1, "changed": 0})
    assert standing(config, PEOPLE[0])[:2] == ("subscribed", False)

    assert post(mailgun_body(mailgun_event("failed", PEOPLE[1], severity="temporary"))).json()["changed"] == 0
    assert post(mailgun_body(mailgun_event("complained", PEOPLE[2]))).status_code == 200
    assert post(mailgun_body(mailgun_event("unsubscribed", PEOPLE[3]))).status_code == 200
    assert post(mailgun_body(mailgun_event("delivered", PEOPLE[4]))).json() == {"events": 0, "changed": 0}
    assert standing(config, PEOPLE[1]) == ("subscribed", False, "sent")
    assert standing(config, PEOPLE[2]) == ("complained", True, "sent")
    assert standing(config, PEOPLE[3]) == ("unsubscribed", False, "sent")

    spam = mailgun_event("complained", PEOPLE[5])
    assert post(mailgun_body(spam, key="wrong-key")).status_code == 401
    assert post(mailgun_body(spam, timestamp=str(int(time.time()) - 3600))).status_code == 401
    assert post({"event-data": spam}).status_code == 401
    assert service.client.post("/webhooks/mailgun", content=b"timestamp=1&token=2").status_code == 400
    assert post(mailgun_body({"event": "failed", "severity": "permanent"})).status_code == 400
    assert standing(config, PEOPLE[5]) == ("subscribed", False, "sent")


# -- Postmark ---------------------------------------------------------------------------------

def test_postmark(service):
    config = service.config

    def post(body, auth=POSTMARK):
        return service.client.post("/webhooks/postmark", json=body, auth=auth)

    bounce = {"RecordType": "Bounce", "ID": 4323372036854775807, "Type": "HardBounce", "TypeCode": 1,
              "Email": PEOPLE[0], "Description": "The server was unable to deliver your message",
              "Details": "smtp;550 5.1.1 no such user", "Metadata": {"message_id": message_id(PEOPLE[0])}}
    assert post(bounce, auth=(POSTMARK[0], "wrong")).status_code == 401
    assert post(bounce, auth=("someone", POSTMARK[1])).status_code == 401
    assert post(bounce, auth=None).status_code == 401
    assert untouched(config)
    answer = post(bounce)
    assert (answer.status_code, answer.json()) == (200, {"events": 1, "changed": 1})
    assert standing(config, PEOPLE[0]) == ("bounced", True, "failed")
    restore(config, PEOPLE[0])
    assert post(bounce).json() == {"events": 1, "changed": 0}  # the same ID again
    assert standing(config, PEOPLE[0])[:2] == ("subscribed", False)

    soft = {**bounce, "ID": 2, "Type": "SoftBounce", "Email": PEOPLE[1]}
    assert post(soft).json() == {"events": 1, "changed": 0}
    complaint = {**bounce, "RecordType": "SpamComplaint", "ID": 3, "Type": "SpamComplaint", "Email": PEOPLE[2]}
    assert post(complaint).json()["changed"] == 1
    change = {"RecordType": "SubscriptionChange", "MessageID": "883953f4", "Recipient": PEOPLE[3],
              "ChangedAt": "2026-12-02T08:00:00Z", "SuppressSending": True, "SuppressionReason": "ManualSuppression"}
    assert post(change).json()["changed"] == 1
    assert post({**change, "Recipient": PEOPLE[4], "SuppressSending": False}).json() == {"events": 0, "changed": 0}
    assert post({"RecordType": "Delivery", "Recipient": PEOPLE[5]}).json() == {"events": 0, "changed": 0}
    assert standing(config, PEOPLE[1]) == ("subscribed", False, "sent")
    assert standing(config, PEOPLE[2]) == ("complained", True, "sent")
    assert standing(config, PEOPLE[3]) == ("unsubscribed", False, "sent")
    assert standing(config, PEOPLE[4]) == ("subscribed", False, "sent")
    assert service.client.post("/webhooks/postmark", content=b"nope", auth=POSTMARK).status_code == 400
    assert post({"RecordType": "Bounce", "Type": "HardBounce", "Email": PEOPLE[5]}).status_code == 400


def test_unset_providers_answer_404_and_the_postmark_allow_list_holds(tmp_path):
    config = make_config(tmp_path, postmark_username=POSTMARK[0], postmark_password=POSTMARK[1],
                         postmark_allow_ips="10.0.0.0/8, 192.0.2.1")
    with Service(config) as running, httpx.Client(base_url=running.url, timeout=20) as client:
        for provider in ("sendgrid", "mailgun", "resend", "ses"):
            assert client.post(f"/webhooks/{provider}", content=b"[]").status_code == 404
        bounce = {"RecordType": "Bounce", "ID": 1, "Type": "HardBounce", "Email": PEOPLE[0]}
        assert client.post("/webhooks/postmark", json=bounce, auth=POSTMARK).status_code == 403
        assert client.get("/webhooks/postmark").status_code == 405
    assert untouched(config)


# -- Resend (Svix) ----------------------------------------------------------------------------

def resend_headers(body: bytes, msg_id=None, timestamp=None, key=RESEND_KEY, extra_signatures=()):
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    timestamp = timestamp or str(int(time.time()))
    sig = base64.b64encode(hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()).decode()
    return {"svix-id": msg_id, "svix-timestamp": timestamp,
            "svix-signature": " ".join([*extra_signatures, f"v1,{sig}"]), "Content-Type": "application/json"}


def resend_body(kind, email, **data):
    return json.dumps({"type": kind, "created_at": "2026-12-02T08:00:00.000Z", "data": {
        "email_id": uuid.uuid4().hex, "to": [email], "subject": "Brief",
        "headers": [{"name": "X-Newsletter-Message-Id", "value": message_id(email)}], **data}}).encode()


def test_resend(service):
    config = service.config

    def post(body, headers):
        return service.client.post("/webhooks/resend", content=body, headers=headers)

    body = resend_body("email.bounced", PEOPLE[0], bounce={"type": "Permanent", "subType": "General",
                                                           "message": "550 5.1.1 no such user"})
    headers = resend_headers(body, extra_signatures=["v1,c29tZXRoaW5nIGVsc2U=", "v2,abc"])  # rotation: one matches
    answer = post(body, headers)
    assert (answer.status_code, answer.json()) == (200, {"events": 1, "changed": 1})
    assert standing(config, PEOPLE[0]) == ("bounced", True, "failed")
    restore(config, PEOPLE[0])
    assert post(body, headers).json() == {"events": 1, "changed": 0}  # a replay: same svix-id
    assert standing(config, PEOPLE[0])[:2] == ("subscribed", False)

    soft = resend_body("email.bounced", PEOPLE[1], bounce={"type": "Transient", "subType": "MailboxFull"})
    assert post(soft, resend_headers(soft)).json() == {"events": 1, "changed": 0}
    spam = resend_body("email.complained", PEOPLE[2])
    assert post(spam, resend_headers(b"other body")).status_code == 401
    assert post(spam, resend_headers(spam, key=b"another key")).status_code == 401
    assert post(spam, resend_headers(spam, timestamp=str(int(time.time()) - 600))).status_code == 401
    assert post(spam, {"Content-Type": "application/json"}).status_code == 401
    assert standing(config, PEOPLE[2]) == ("subscribed", False, "sent")
    assert post(spam, resend_headers(spam)).json()["changed"] == 1
    assert standing(config, PEOPLE[2]) == ("complained", True, "sent")
    delivered = resend_body("email.delivered", PEOPLE[3])
    assert post(delivered, resend_headers(delivered)).json() == {"events": 0, "changed": 0}
    assert post(b"{]", resend_headers(b"{]")).status_code == 400


# -- Amazon SES through SNS -------------------------------------------------------------------

def sns_message(sns, kind, version="2", **fields):
    message = {"Type": kind, "MessageId": str(uuid.uuid4()), "TopicArn": "arn:aws:sns:us-east-1:123456789012:ses",
               "Timestamp": "2026-12-02T08:00:00.000Z", "SignatureVersion": version,
               "SigningCertURL": f"{sns.url}/SimpleNotificationService-test.pem", **fields}
    names = (("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type") if kind == "Notification"
             else ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"))
    signed = "".join(f"{n}\n{message[n]}\n" for n in names if n in message).encode()
    digest = hashes.SHA1() if version == "1" else hashes.SHA256()
    message["Signature"] = base64.b64encode(sns.key.sign(signed, padding.PKCS1v15(), digest)).decode()
    return message


def ses_bounce(email, bounce_type="Permanent"):
    return json.dumps({"notificationType": "Bounce", "bounce": {
        "bounceType": bounce_type, "bounceSubType": "General", "feedbackId": str(uuid.uuid4()),
        "bouncedRecipients": [{"emailAddress": email, "diagnosticCode": "smtp; 550 5.1.1 no such user"}]},
        "mail": {"messageId": "ses-id", "headers": [{"name": "X-Newsletter-Message-Id", "value": message_id(email)}]}})


def test_ses_through_sns(service, sns):
    config = service.config

    def post(message):
        return service.client.post("/webhooks/ses", content=json.dumps(message).encode(),
                                   headers={"Content-Type": "text/plain; charset=UTF-8",
                                            "x-amz-sns-message-type": message.get("Type", "")})

    confirm = sns_message(sns, "SubscriptionConfirmation", Token="tok-123", Message="You have chosen to subscribe",
                          SubscribeURL=f"{sns.url}/?Action=ConfirmSubscription&Token=tok-123")
    assert post(confirm).status_code == 200
    assert "/?Action=ConfirmSubscription&Token=tok-123" in sns.visits
    assert any(visit.endswith(".pem") for visit in sns.visits)  # the certificate was fetched over https
    elsewhere = sns_message(sns, "SubscriptionConfirmation", Token="t", Message="m",
                            SubscribeURL="https://example.com/?Action=ConfirmSubscription&Token=t")
    assert post(elsewhere).status_code == 401  # not SNS's host: never visited

    bounce = sns_message(sns, "Notification", Message=ses_bounce(PEOPLE[0]), Subject="Amazon SES Email Event")
    answer = post(bounce)
    assert (answer.status_code, answer.json()) == (200, {"events": 1, "changed": 1})
    assert standing(config, PEOPLE[0]) == ("bounced", True, "failed")
    restore(config, PEOPLE[0])
    assert post(bounce).json() == {"events": 1, "changed": 0}  # SNS delivered it twice
    assert standing(config, PEOPLE[0])[:2] == ("subscribed", False)

    complaint = json.dumps({"eventType": "Complaint", "complaint": {
        "feedbackId": "fb-1", "complaintFeedbackType": "abuse", "complainedRecipients": [{"emailAddress": PEOPLE[1]}]},
        "mail": {"headers": [{"name": "X-Newsletter-Message-Id", "value": message_id(PEOPLE[1])}]}})
    assert post(sns_message(sns, "Notification", version="1", Message=complaint)).json()["changed"] == 1
    assert standing(config, PEOPLE[1]) == ("complained", True, "sent")
    transient = sns_message(sns, "Notification", Message=ses_bounce(PEOPLE[2], "Transient"))
    assert post(transient).json() == {"events": 1, "changed": 0}
    delivery = sns_message(sns, "Notification", Message=json.dumps({"notificationType": "Delivery", "mail": {}}))
    assert post(delivery).json() == {"events": 0, "changed": 0}

    forged = sns_message(sns, "Notification", Message=ses_bounce(PEOPLE[3]))
    forged["Message"] = ses_bounce(PEOPLE[4])
    assert post(forged).status_code == 401
    foreign = sns_message(sns, "Notification", Message=ses_bounce(PEOPLE[3]),
                          SigningCertURL="https://example.com/cert.pem")
    assert post(foreign).status_code == 401
    plain = sns_message(sns, "Notification", Message=ses_bounce(PEOPLE[3]),
                        SigningCertURL=sns.url.replace("https:", "http:") + "/SimpleNotificationService-test.pem")
    assert post(plain).status_code == 401
    assert post({**sns_message(sns, "Notification", Message=ses_bounce(PEOPLE[3])), "SignatureVersion": "3"}).status_code == 401
    assert standing(config, PEOPLE[3]) == standing(config, PEOPLE[4]) == ("subscribed", False, "sent")
    assert post(sns_message(sns, "Notification", Message="not json")).status_code == 400
    assert service.client.post("/webhooks/ses", content=b"{").status_code == 400


def test_a_batch_bigger_than_the_services_body_limit_is_taken_at_the_webhook_only(service, sendgrid_key):
    """SendGrid posts up to thousands of events at once: [webhooks] max_body is theirs, while
    every other route keeps [serve] max_body (64 KB by default)."""
    padding = "x" * 300
    events = [sendgrid_event("delivered", PEOPLE[i % len(PEOPLE)], note=padding) for i in range(400)]
    events.append(sendgrid_event("spamreport", PEOPLE[0]))
    body = json.dumps(events).encode()
    assert len(body) > 2 * 65536
    answer = sendgrid_post(service, sendgrid_key, events, body=body)
    assert answer.status_code == 200, answer.text
    assert standing(service.config, PEOPLE[0])[:2] == ("complained", True)
    elsewhere = service.client.post("/health", content=body)  # any other path: the small limit
    assert elsewhere.status_code == 413


def test_mailgun_token_cache_cannot_be_dodged_by_moving_the_split(service):
    # Mailgun signs timestamp + token, concatenated, and not the body: the token cache is what
    # stops a captured signature from carrying other events. Moving the split between the two
    # ("...e0" + rest) keeps the HMAC and the time (a float "1700000000e0") but makes a new token.
    config = service.config
    post = lambda body: service.client.post("/webhooks/mailgun", json=body)  # noqa: E731
    token = "e0" + uuid.uuid4().hex + uuid.uuid4().hex[:16]
    captured = mailgun_body(mailgun_event("delivered", PEOPLE[0]), token=token)
    assert post(captured).status_code == 200
    signed = captured["signature"]
    forged = {"signature": {"timestamp": signed["timestamp"] + "e0", "token": signed["token"][2:],
                            "signature": signed["signature"]},
              "event-data": mailgun_event("complained", PEOPLE[5])}
    assert post(forged).status_code == 401
    assert standing(config, PEOPLE[5]) == ("subscribed", False, "sent")


def test_mailgun_a_signature_that_is_not_ascii_is_refused_not_a_server_error(service):
    body = mailgun_body(mailgun_event("complained", PEOPLE[5]))
    body["signature"]["signature"] = "\u00e9" * 64
    answer = service.client.post("/webhooks/mailgun", json=body)
    assert answer.status_code == 401  # a forgery: Mailgun's retries of a 500 would go on for hours
    assert standing(service.config, PEOPLE[5]) == ("subscribed", False, "sent")


def test_a_deeply_nested_body_is_malformed_not_a_server_error(service):
    # Mailgun's signature is inside the body, so this is read before anything is checked
    answer = service.client.post("/webhooks/mailgun", content=b"[" * 10_000,
                                 headers={"Content-Type": "application/json"})
    assert answer.status_code == 400


def test_a_chunked_body_over_the_webhook_limit_is_413_not_a_server_error(tmp_path):
    # No Content-Length (chunked): the service's own limit notices while reading, inside the
    # webhook's handler, which must answer 413 like the handler's own check, not 500.
    config = make_config(tmp_path, mailgun_signing_key=MAILGUN_KEY, max_body=2048)

    def chunks():
        for _ in range(8):
            yield b"x" * 1024

    with Service(config) as running, httpx.Client(base_url=running.url, timeout=20) as client:
        answer = client.post("/webhooks/mailgun", content=chunks(), headers={"Content-Type": "application/json"})
    assert answer.status_code == 413


def test_mailgun_a_permanent_failure_that_blames_the_sender_suppresses_nobody(service):
    # The same rule as every other door (DESIGN, outcome.py): only "this mailbox does not
    # exist" suppresses; a refusal of our sending (a block list, relay denied) is not the reader's.
    config, post = service.config, lambda body: service.client.post("/webhooks/mailgun", json=body)
    blocked = mailgun_event("failed", PEOPLE[4], severity="permanent", reason="bounce", **{"delivery-status": {
        "code": 554, "message": "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org"}})
    assert post(mailgun_body(blocked)).status_code == 200
    assert standing(config, PEOPLE[4]) == ("subscribed", False, "sent")
    gone = mailgun_event("failed", PEOPLE[5], severity="permanent", reason="bounce", **{"delivery-status": {
        "code": 550, "message": "5.1.1 The email account that you tried to reach does not exist"}})
    assert post(mailgun_body(gone)).status_code == 200
    assert standing(config, PEOPLE[5]) == ("bounced", True, "failed")
    listed = mailgun_event("failed", PEOPLE[3], severity="permanent", reason="suppress-bounce", **{"delivery-status": {
        "code": 605, "message": "Not delivering to previously bounced address"}})
    assert post(mailgun_body(listed)).status_code == 200  # Mailgun's own bounce list: still the reader's
    assert standing(config, PEOPLE[3]) == ("bounced", True, "failed")


def test_ses_a_permanent_bounce_that_blames_the_sender_suppresses_nobody(service, sns):
    config = service.config
    event = json.loads(ses_bounce(PEOPLE[4]))
    event["bounce"]["bouncedRecipients"][0].update(
        status="5.7.1", diagnosticCode="smtp; 554 5.7.1 <brief@watchman.example>: Relay access denied")
    message = sns_message(sns, "Notification", Message=json.dumps(event))
    answer = service.client.post("/webhooks/ses", content=json.dumps(message).encode(),
                                 headers={"Content-Type": "text/plain; charset=UTF-8"})
    assert answer.status_code == 200
    assert standing(config, PEOPLE[4]) == ("subscribed", False, "sent")


def test_sendgrid_a_bounce_that_blames_the_sender_suppresses_nobody(service, sendgrid_key):
    events = [sendgrid_event("bounce", PEOPLE[4], type="bounce", status="5.7.1",
                             reason="554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using "
                                    "zen.spamhaus.org")]
    answer = sendgrid_post(service, sendgrid_key, events)
    assert answer.status_code == 200
    assert standing(service.config, PEOPLE[4]) == ("subscribed", False, "sent")
