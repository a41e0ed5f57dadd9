"""Sign-up with double opt-in, against the service run by uvicorn on a loopback port, with
real HTTP (httpx), the confirmation captured in the outbox or by a loopback SMTP server,
and its link followed in headless Chromium."""

from __future__ import annotations

import email
import email.policy
import re
import threading
import time

import httpx
import pytest
import uvicorn

from api_server import AWS_KEY_ID, AWS_SECRET, KEYS, MAILGUN_DOMAIN, PROVIDERS, SES_REGION, ApiServer, _form_fields
from cdp import Browser
from conftest import ROOT, config_for, run_cli, store_of
from newsletter.errors import ConfigError
from newsletter.outcome import COMPLAINT, HARD_BOUNCE, Event
from newsletter.recipients import Recipient
from newsletter.web import signup
from newsletter.web.app import create_app
from smtp_server import Handler, Server, free_port

SECRET = "test-secret-not-for-production"
PUBLIC = "https://news.example.com"
OTHER_SITE = "https://blog.example.org"

pytestmark = pytest.mark.usefixtures("store_backend")  # each test on SQLite and on PostgreSQL


def signup_env(tmp_path, **extra):
    env = {
        "NEWSLETTER_SECRET": SECRET,
        "NEWSLETTER_DESIGN_TEMPLATES": str(ROOT / "templates"),
        "NEWSLETTER_STORE_PATH": str(tmp_path / "store.sqlite3"),
        "NEWSLETTER_SEND_BACKEND": "outbox",
        "NEWSLETTER_SEND_OUTBOX": str(tmp_path / "outbox"),
        "NEWSLETTER_SERVE_PUBLIC_URL": PUBLIC,
        "NEWSLETTER_SIGNUP_ENABLED": "true",
        "NEWSLETTER_SIGNUP_ALLOWED_ORIGINS": OTHER_SITE,
    }
    env.update({f"NEWSLETTER_{k.upper()}": str(v) for k, v in extra.items()})
    return env


class Service:
    """The app served by uvicorn in a thread on a free loopback port."""

    def __init__(self, env):
        self.config = config_for(env)
        self.app = create_app(self.config)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.http = httpx.Client(base_url=self.base, timeout=30)
        return self

    def __exit__(self, *exc):
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def signup(self) -> signup.Signup:
        return self.app.state.signup

    def settled(self, n: int | None = None) -> None:
        """Wait until every confirmation handed to the background has finished (no timing
        is asserted: this only waits for the work that the answer does not wait for)."""
        deadline = time.monotonic() + 30
        while sum(self.signup.done.values()) < (self.signup.scheduled if n is None else n):
            assert time.monotonic() < deadline, f"confirmations not finished: {self.signup.done}"
            time.sleep(0.02)

    def outbox(self, address: str):
        path = self.config.send.outbox / "signup" / f"{address}.eml"
        return email.message_from_bytes(path.read_bytes(), policy=email.policy.default) if path.exists() else None

    def local(self, link: str) -> str:
        assert link.startswith(PUBLIC + "/subscribe/confirm/"), link
        return self.base + link[len(PUBLIC):]

    def subscriber(self, address: str):
        with store_of(self.config) as store:
            return store.db.execute("SELECT email, name, status, changed_how FROM subscribers WHERE email = ?",
                                    (address,)).fetchone()


@pytest.fixture
def service(tmp_path):
    with Service(signup_env(tmp_path)) as running:
        yield running


def link_in(message) -> str:
    text = message.get_body(("plain",)).get_content()
    return re.search(r"https://\S+/subscribe/confirm/\S+", text).group(0)


def token_of(link: str) -> str:
    return link.rsplit("/", 1)[1]


# -- the double opt-in, end to end ---------------------------------------------------------------

def test_form_then_link_clicked_in_chromium_subscribes(service):
    with Browser() as browser:
        browser.open(service.base + "/subscribe")
        assert "Subscribe to" in browser.text()
        browser.fill("#email", "Reader@Example.COM")
        browser.fill("#name", "Ada Reader")
        browser.click("button[type=submit]")
        assert "a message is on its way" in browser.text()
        service.settled(1)
        assert service.subscriber("Reader@example.com") is None  # nothing until the link is followed

        message = service.outbox("Reader@example.com")
        assert message is not None, "no confirmation in the outbox"
        for header in ("From", "To", "Subject", "Date", "Message-ID"):
            assert len(message.get_all(header)) == 1, header
        assert message["To"].addresses[0].addr_spec == "Reader@example.com"
        assert message["Message-ID"].endswith("@" + service.config.sender.domain + ">")
        assert message.get_content_type() == "multipart/alternative"
        assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
        assert "List-Unsubscribe" not in message
        link = link_in(message)
        assert link in message.get_body(("html",)).get_content()

        # GET (a scanner, a preview) shows the button and changes nothing
        page = service.http.get(service.local(link))
        assert page.status_code == 200 and "<button" in page.text and "Reader@example.com" in page.text
        assert service.subscriber("Reader@example.com") is None

        browser.open(service.local(link))
        browser.click("#confirm")
        assert "now subscribed" in browser.text()
    assert service.subscriber("Reader@example.com") == ("Reader@example.com", "Ada Reader", "subscribed",
                                                        "sign-up confirmed")


def test_confirmation_over_smtp(tmp_path):
    handler = Handler()
    with Server(handler, auth=False) as smtp, Service(signup_env(
            tmp_path, send_backend="outbox", signup_backend="smtp", smtp_host="127.0.0.1", smtp_port=smtp.port,
            smtp_security="none", smtp_timeout=10)) as service:
        answers = [service.http.post("/subscribe", json={"email": "smtp.reader@example.com"}) for _ in range(2)]
        assert [a.status_code for a in answers] == [202, 202]
        service.settled(2)
        # two sign-ups within resend_minutes: one confirmation
        assert handler.delivered() == {"smtp.reader@example.com": 1}
        assert service.signup.done == {"sent": 1, "recent": 1}
        assert not (tmp_path / "outbox" / "signup").exists()
        message = email.message_from_bytes(handler.received[0].data, policy=email.policy.default)
        assert message["Subject"] == f"Confirm your subscription to {service.config.publication.name}"
        answer = service.http.post(service.local(link_in(message)))
        assert answer.status_code == 200
    assert service.subscriber("smtp.reader@example.com")[2] == "subscribed"


def test_the_form_page_is_escaped(tmp_path):
    with Service(signup_env(tmp_path, publication_name="Brief <script>x</script> & Co")) as service:
        page = service.http.get("/subscribe")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Brief &lt;script&gt;x&lt;/script&gt; &amp; Co" in page.text and "<script>" not in page.text
    assert 'name="email"' in page.text and 'name="name"' in page.text
    assert f'name="{signup.HONEYPOT}"' in page.text


# -- bad, expired and forged links ----------------------------------------------------------------

def test_expired_and_forged_links_are_refused(service):
    pub = service.config.publication
    expired = signup.make_token(SECRET.encode(), pub.list_id, "late@example.com", None, int(time.time()) - 60)
    forged = signup.make_token(b"another secret", pub.list_id, "forged@example.com", None, int(time.time()) + 3600)
    good = signup.make_token(SECRET.encode(), pub.list_id, "good@example.com", None, int(time.time()) + 3600)
    tampered = good[:-2] + ("AA" if good[-2:] != "AA" else "BB")
    other_list = signup.make_token(SECRET.encode(), "other.example.com", "good@example.com", None,
                                   int(time.time()) + 3600)
    for method in ("GET", "POST"):
        answer = service.http.request(method, f"/subscribe/confirm/{expired}")
        assert answer.status_code == 410 and "expired" in answer.text
        for token in (forged, tampered, other_list, "not-a-token", "A" * 5000):
            answer = service.http.request(method, f"/subscribe/confirm/{token}")
            assert answer.status_code == 400 and "not a valid confirmation link" in answer.text, token
            assert "Traceback" not in answer.text
    for address in ("late@example.com", "forged@example.com", "good@example.com"):
        assert service.subscriber(address) is None


# -- the same answer for everyone; the honeypot; suppressed addresses ---------------------------

def test_existing_subscriber_gets_the_same_answer(service):
    with store_of(service.config) as store:
        store.add(Recipient("member@example.com", "Member"), "test")
    answers = {}
    for address in ("member@example.com", "newcomer@example.com"):
        for kind in ("form", "json"):
            if kind == "form":
                answer = service.http.post("/subscribe", data={"email": address})
            else:
                answer = service.http.post("/subscribe", json={"email": address})
            answers[address, kind] = (answer.status_code, answer.text,
                                      sorted((k, v) for k, v in answer.headers.items() if k not in ("date",)))
    for kind in ("form", "json"):
        assert answers["member@example.com", kind] == answers["newcomer@example.com", kind]
    assert answers["member@example.com", "json"][0] == 202


def test_honeypot_answers_alike_and_does_nothing(service):
    bot = service.http.post("/subscribe", data={"email": "bot@example.com", signup.HONEYPOT: "http://spam"})
    human = service.http.post("/subscribe", data={"email": "human@example.com", signup.HONEYPOT: ""})
    assert (bot.status_code, bot.text) == (human.status_code, human.text) == (202, human.text)
    service.settled()
    assert service.signup.scheduled == 1 and service.signup.done == {"sent": 1}
    assert service.outbox("bot@example.com") is None and service.outbox("human@example.com") is not None


@pytest.mark.parametrize("kind", [HARD_BOUNCE, COMPLAINT])
def test_suppressed_address_is_never_mailed_nor_subscribed(service, kind):
    address = "gone.reader@example.com"
    pub = service.config.publication
    # a link sent before the bounce or complaint came in
    token = signup.make_token(SECRET.encode(), pub.list_id, address, "Old Link", int(time.time()) + 3600)
    with store_of(service.config) as store:
        store.add(Recipient(address), "test")
        assert store.record_event(Event(kind, address, "test"))
    suppressed = service.http.post("/subscribe", json={"email": address})
    fresh = service.http.post("/subscribe", json={"email": "fresh@example.com"})
    assert (suppressed.status_code, suppressed.text) == (fresh.status_code, fresh.text)
    service.settled(2)
    assert service.signup.done == {"sent": 1, "blocked": 1}
    assert service.outbox(address) is None

    answer = service.http.post(f"/subscribe/confirm/{token}")
    assert answer.status_code == 409 and "cannot subscribe" in answer.text
    assert "bounce" not in answer.text.lower() and "complain" not in answer.text.lower()
    assert service.subscriber(address)[2] == ("bounced" if kind == HARD_BOUNCE else "complained")


def test_unsubscribed_reader_may_come_back(service):
    with store_of(service.config) as store:
        store.add(Recipient("back@example.com"), "test")
        store.set_status("back@example.com", "unsubscribed", "one-click")
    service.http.post("/subscribe", json={"email": "back@example.com", "name": "Back Again"})
    service.settled(1)
    answer = service.http.post(service.local(link_in(service.outbox("back@example.com"))))
    assert answer.status_code == 200
    assert service.subscriber("back@example.com")[1:3] == ("Back Again", "subscribed")


# -- bad input ------------------------------------------------------------------------------------

def test_bad_input_is_a_clear_4xx_and_sends_nothing(service):
    cases = [
        ({"json": {"email": "not an address"}}, 400, "valid email address"),
        ({"json": {"name": "no address"}}, 400, "valid email address"),
        ({"json": ["a@example.com"]}, 400, "JSON object"),
        ({"json": {"email": "a@example.com", "name": "two\nlines"}}, 400, "one line"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "could not be read"),
        ({"content": b"email=a@example.com", "headers": {"content-type": "text/plain"}}, 415, "urlencoded"),
        ({"data": {"email": "a@example.com", "name": "x" * 20_000}}, 413, "too large"),
    ]
    for kwargs, status, words in cases:
        answer = service.http.post("/subscribe", **kwargs)
        assert answer.status_code == status and words in answer.text, (kwargs, answer.text)
    assert service.signup.scheduled == 0


# -- CORS ---------------------------------------------------------------------------------------

def test_cors_preflight_and_cross_origin_post(service):
    preflight = service.http.options("/subscribe", headers={
        "Origin": OTHER_SITE, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == OTHER_SITE
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers
    assert "Origin" in preflight.headers["vary"]

    answer = service.http.post("/subscribe", json={"email": "cors@example.com"}, headers={"Origin": OTHER_SITE})
    assert answer.status_code == 202 and answer.json()["ok"] is True
    assert answer.headers["access-control-allow-origin"] == OTHER_SITE
    assert "access-control-allow-credentials" not in answer.headers

    stranger = "https://evil.example.net"
    refused = service.http.options("/subscribe", headers={"Origin": stranger, "Access-Control-Request-Method": "POST"})
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    refused = service.http.post("/subscribe", data={"email": "victim@example.com"}, headers={"Origin": stranger})
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    service.settled()
    assert service.signup.scheduled == 1 and service.outbox("victim@example.com") is None


# -- rate limits ------------------------------------------------------------------------------------

def test_rate_limit_per_client(tmp_path):
    with Service(signup_env(tmp_path, signup_client_limit=3)) as service:
        answers = [service.http.post("/subscribe", json={"email": f"c{i}@example.com"}) for i in range(4)]
        assert [a.status_code for a in answers] == [202, 202, 202, 429]
        assert int(answers[3].headers["retry-after"]) >= 1
        service.settled()
        assert service.signup.scheduled == 3


def test_rate_limit_per_address(tmp_path):
    with Service(signup_env(tmp_path, signup_address_limit=2, signup_resend_minutes=0)) as service:
        answers = [service.http.post("/subscribe", json={"email": "same@example.com"}) for _ in range(3)]
        assert [a.status_code for a in answers] == [202, 202, 429]
        assert int(answers[2].headers["retry-after"]) >= 1
        # the domain's case does not make another address
        assert service.http.post("/subscribe", json={"email": "same@EXAMPLE.com"}).status_code == 429
        assert service.http.post("/subscribe", json={"email": "other@example.com"}).status_code == 202
        service.settled()
        assert service.signup.done == {"sent": 3}  # resend_minutes = 0: each one mailed


def test_token_bucket_refills():
    bucket = signup.TokenBucket(2, 3600)
    assert [bucket.take("k", now=0.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.take("k", now=0.0) == pytest.approx(1800)
    assert bucket.take("k", now=1800.0) == 0.0
    assert bucket.take("other", now=0.0) == 0.0


# -- start-up -----------------------------------------------------------------------------------

def test_api_backend_settings_named_at_start(tmp_path):
    env = signup_env(tmp_path, send_backend="mailgun")
    with pytest.raises(ConfigError) as caught:
        create_app(config_for(env))
    assert "NEWSLETTER_MAILGUN_API_KEY" in str(caught.value) and "mailgun.domain" in str(caught.value)
    create_app(config_for({**env, "NEWSLETTER_SIGNUP_BACKEND": "outbox"}))  # a backend of its own: fine
    create_app(config_for({**env, "NEWSLETTER_MAILGUN_API_KEY": KEYS["mailgun"],
                           "NEWSLETTER_MAILGUN_DOMAIN": MAILGUN_DOMAIN}))  # an API backend: fine too
    result = run_cli("serve", "--port", free_port(), env=env)
    assert result.returncode == 2 and "NEWSLETTER_MAILGUN_API_KEY" in result.stderr


def test_missing_secret_and_url_named_at_start(tmp_path):
    env = {k: v for k, v in signup_env(tmp_path).items()
           if k not in ("NEWSLETTER_SECRET", "NEWSLETTER_SERVE_PUBLIC_URL")}
    with pytest.raises(ConfigError) as caught:
        create_app(config_for(env))
    assert "NEWSLETTER_SECRET" in str(caught.value) and "public_url" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_disabled_signup_is_not_found(tmp_path):
    with Service(signup_env(tmp_path, signup_enabled="false")) as service:
        assert service.http.get("/subscribe").status_code == 404
        assert service.http.post("/subscribe", json={"email": "a@example.com"}).status_code == 404


def test_confirmation_refused_as_no_such_mailbox_suppresses(tmp_path):
    handler = Handler(refuse_rcpt="550 5.1.1 <nobody@example.com>: no such user")
    with Server(handler, auth=False) as smtp, Service(signup_env(
            tmp_path, send_backend="smtp", smtp_host="127.0.0.1", smtp_port=smtp.port, smtp_security="none",
            smtp_timeout=10)) as service:
        answer = service.http.post("/subscribe", json={"email": "nobody@example.com"})
        assert answer.status_code == 202  # the answer went out before the server said no
        service.settled(1)
        assert service.signup.done == {"failed": 1}
    with store_of(service.config) as store:
        assert store.suppressed("nobody@example.com")  # through the one outcome policy, as any bounce


def test_unreachable_server_is_logged_not_shown(tmp_path, caplog):
    with Service(signup_env(tmp_path, send_backend="smtp", smtp_host="127.0.0.1", smtp_port=free_port(),
                            smtp_security="none", smtp_timeout=5)) as service:
        answer = service.http.post("/subscribe", json={"email": "later@example.com"})
        assert answer.status_code == 202
        service.settled(1)
        assert service.signup.done == {"failed": 1}
    assert any("later@example.com" in r.getMessage() and "not sent" in r.getMessage() for r in caplog.records)
    assert SECRET not in caplog.text


# -- confirmations through the HTTP email APIs ---------------------------------------------------

WRONG_KEY = "wrong-K3y-That-Must-Never-Leak-9999"
REFUSED_KEY_STATUS = {"sendgrid": 401, "mailgun": 401, "postmark": 401, "resend": 403, "ses": 403}  # as each says


@pytest.fixture
def aws(monkeypatch):
    """SES reads the standard AWS variables from the process environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return monkeypatch


def api_settings(server, provider, key=None, **more):
    """[send] backend = provider, pointed at the loopback stand-in."""
    settings = {"send_backend": provider, f"{provider}_base_url": server.url, f"{provider}_timeout": 10,
                f"{provider}_max_retries": 2, f"{provider}_retry_delay": 0.05, f"{provider}_requests_per_second": 0}
    if provider in KEYS:
        settings[f"{provider}_api_key"] = key or KEYS[provider]
    if provider == "mailgun":
        settings["mailgun_domain"] = MAILGUN_DOMAIN
    if provider == "ses":
        settings["ses_region"] = SES_REGION
    return {**settings, **more}


def assert_single_message_shape(provider, request, address, name):
    """The provider's documented single-message request: one recipient, no newsletter parts."""
    assert request.method == "POST"
    if provider == "sendgrid":
        body = request.json()
        assert request.path == "/v3/mail/send"
        assert body["personalizations"] == [{"to": [{"email": address, "name": name}]}]
        assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
        assert {k: v["enable"] for k, v in body["tracking_settings"].items()} == {
            "subscription_tracking": False, "open_tracking": False, "click_tracking": False}
        assert "List-Unsubscribe" not in body["headers"] and "substitutions" not in str(body)
    elif provider == "mailgun":
        fields = dict(_form_fields(request))
        assert request.path == f"/v3/{MAILGUN_DOMAIN}/messages"
        assert request.headers["content-type"].startswith("multipart/form-data")
        assert {"from", "to", "subject", "text", "html"} <= set(fields) and "recipient-variables" not in fields
        assert [v for n, v in _form_fields(request) if n == "to"] == [f'"{name}" <{address}>']
        assert fields["o:tracking"] == fields["o:tracking-clicks"] == fields["o:tracking-opens"] == "no"
        assert not any(n.lower().startswith("h:list-") for n in fields)
    elif provider == "postmark":
        body = request.json()
        assert request.path == "/email" and isinstance(body, dict)
        assert body["MessageStream"] == "outbound"  # transactional, never the newsletters' broadcast stream
        assert body["To"] == f'"{name}" <{address}>' and body["TextBody"] and body["HtmlBody"]
        assert body["TrackOpens"] is False and body["TrackLinks"] == "None"
        assert not any(h["Name"].lower().startswith("list-") for h in body["Headers"])
    elif provider == "resend":
        body = request.json()
        assert request.path == "/emails" and isinstance(body, dict)
        assert body["to"] == [f'"{name}" <{address}>'] and body["text"] and body["html"]
        assert re.fullmatch(r"signup/[^<>\s]+@[^<>\s]+", request.idempotency_key)
        assert request.idempotency_key[len("signup/"):] == body["headers"]["X-Newsletter-Message-Id"]
        assert not any(k.lower().startswith("list-") for k in body["headers"])
    else:
        body = request.json()
        assert request.path == "/v2/email/outbound-emails" and request.sig_verified
        assert body["Destination"] == {"ToAddresses": [address]} and list(body["Content"]) == ["Raw"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_confirmation_through_each_api(tmp_path, provider, aws):
    address, name = f"{provider}.reader@example.com", "Ada Reader"
    with ApiServer() as server, Service(signup_env(tmp_path, **api_settings(server, provider))) as service:
        answer = service.http.post("/subscribe", json={"email": address, "name": name})
        assert answer.status_code == 202
        service.settled(1)
        assert service.signup.done == {"sent": 1}
        assert len(server.requests) == 1 and server.requests[0].outcome == "accepted"
        assert_single_message_shape(provider, server.requests[0], address, name)
        [received] = server.received
        assert received.address == address and "Confirm your subscription" in received.subject
        link = re.search(r"https://\S+/subscribe/confirm/[\w-]+", received.text).group(0)
        assert link in received.html
        assert "list-unsubscribe" not in received.headers and received.headers["auto-submitted"] == "auto-generated"
        assert not (tmp_path / "outbox").exists()  # it went through the API, not the outbox
        assert service.subscriber(address) is None  # nothing until the link is followed
        assert service.http.post(service.local(link)).status_code == 200
    assert service.subscriber(address)[2:] == ("subscribed", "sign-up confirmed")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_refused_api_key_is_logged_and_the_service_goes_on(tmp_path, provider, aws, caplog):
    if provider == "ses":
        aws.setenv("AWS_SECRET_ACCESS_KEY", WRONG_KEY)
    with ApiServer() as server, Service(signup_env(tmp_path, **api_settings(server, provider, key=WRONG_KEY))) \
            as service:
        answer = service.http.post("/subscribe", json={"email": "refused@example.com"})
        assert answer.status_code == 202  # the answer went out before the provider said no
        service.settled(1)
        assert service.signup.done == {"failed": 1}
        # one request: a refused key is never retried
        assert [(r.status, r.outcome) for r in server.requests] == [(REFUSED_KEY_STATUS[provider], "unauthorized")]
        # the service keeps answering
        assert service.http.get("/subscribe").status_code == 200
        assert service.http.post("/subscribe", json={"email": "next@example.com"}).status_code == 202
        service.settled(2)
        assert service.signup.done == {"failed": 2}
    assert service.subscriber("refused@example.com") is None
    with store_of(service.config) as store:
        assert not store.suppressed("refused@example.com")  # the account's fault, not the reader's
    warnings = [r.getMessage() for r in caplog.records if r.name == "newsletter.signup" and r.levelname == "WARNING"]
    assert any("refused@example.com" in w and f"not sent through {provider}" in w and "the key" in w
               for w in warnings), warnings
    for secret in (WRONG_KEY, AWS_SECRET, SECRET, *KEYS.values()):
        assert secret not in caplog.text


def test_postmark_transactional_stream_setting(tmp_path, caplog):
    with ApiServer() as server, Service(signup_env(tmp_path, **api_settings(
            server, "postmark", postmark_transactional_stream="signups"))) as service:
        service.http.post("/subscribe", json={"email": "stream@example.com"})
        service.settled(1)
        [request] = server.requests
        assert request.json()["MessageStream"] == "signups"  # the setting is what is sent
        assert service.signup.done == {"failed": 1}  # the stand-in has no such stream: Postmark 1235
    assert any("Postmark API response 422" in r.getMessage() and "signups" in r.getMessage()
               for r in caplog.records)


def test_resend_confirmation_retried_under_its_key_is_sent_once(tmp_path):
    with ApiServer() as server, Service(signup_env(tmp_path, **api_settings(server, "resend"))) as service:
        server.fail(1, status=500, after=True)  # taken and recorded, then the answer is lost
        service.http.post("/subscribe", json={"email": "once@example.com"})
        service.settled(1)
        assert service.signup.done == {"sent": 1}
        assert [r.outcome for r in server.requests] == ["failed after taking it", "replayed"]
        assert server.requests[0].idempotency_key == server.requests[1].idempotency_key
        assert server.delivered() == {"once@example.com": 1}


def test_postmark_confirmation_with_a_lost_answer_is_not_sent_again(tmp_path, caplog):
    with ApiServer() as server, Service(signup_env(tmp_path, **api_settings(server, "postmark"))) as service:
        server.fail(1, status=500, after=True)
        service.http.post("/subscribe", json={"email": "maybe@example.com"})
        service.settled(1)
        assert service.signup.done == {"failed": 1}
        assert len(server.requests) == 1  # no idempotency key: never sent blind again
        assert server.delivered() == {"maybe@example.com": 1}
    assert any("may have been delivered" in r.getMessage() for r in caplog.records)


def test_inactive_recipient_at_postmark_is_suppressed(tmp_path):
    with ApiServer() as server, Service(signup_env(tmp_path, **api_settings(server, "postmark"))) as service:
        server.inactive("bounced.before@example.com")
        service.http.post("/subscribe", json={"email": "bounced.before@example.com"})
        service.settled(1)
        assert service.signup.done == {"failed": 1}
    with store_of(service.config) as store:
        assert store.suppressed("bounced.before@example.com")  # the same policy as any send's 406


def test_a_deeply_nested_json_body_is_a_bad_request_not_a_server_error(service):
    # 16 KB of "[" is within the body limit, and json.loads raises RecursionError on it
    answer = service.http.post("/subscribe", content=b"[" * 10_000, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    assert answer.json()["ok"] is False
