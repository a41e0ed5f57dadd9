"""Merge fields: the subscriber's name and CSV columns in the subject and the templates,
spliced per recipient (rendering stays once per issue) and arriving, escaped where they go,
through the outbox and every API; and `subscribers export` then `import` into a new store
reproducing it exactly."""

import csv
import email
import email.policy
import html
import io
import re
import shutil
import sqlite3

import pytest

from api_server import AWS_KEY_ID, AWS_SECRET, ApiServer
from conftest import EXAMPLE, MINIMAL, ROOT, config_for, run_cli
from newsletter.errors import TemplateError
from newsletter.message import MessageFactory
from newsletter.reader import load_issue, read_issue
from newsletter.recipients import Recipient
from newsletter.render import Renderer
from newsletter.sender import send_issue
from newsletter.store import Store
from newsletter.tokens import Signer
from test_api_backends import api_env

SUBJECT = "{{name|Reader}}, news for {{ City | your town }}"
# address -> (name, fields, the subject, the greeting's name as text) they must get
PEOPLE = {
    "ana@example.com": ("Ana", {"city": "Lisbon"}, "Ana, news for Lisbon", "Ana"),
    "ann@example.com": ('<b>Ann & "Bo"</b>', {"city": "<i>Oslo</i>"}, '<b>Ann & "Bo"</b>, news for <i>Oslo</i>',
                        '<b>Ann & "Bo"</b>'),
    "nobody@example.com": (None, {}, "Reader, news for your town", "there"),
    "empty@example.com": (None, {"city": "  "}, "Reader, news for your town", "there"),
    "zoe@example.com": ("Zoë", {"City": "Zürich"}, "Zoë, news for Zürich", "Zoë"),
    # a line break in a value never starts a header line: it becomes a space
    "eve@example.com": ("Eve", {"city": "Rome\r\nBcc: victim@example.com"}, "Eve, news for Rome Bcc: victim@example.com",
                        "Eve"),
    # looks like an RFC 2047 encoded word: the subject is encoded, so it reads as written
    "enc@example.com": ("=?utf-8?q?Evil?=", {}, "=?utf-8?q?Evil?=, news for your town", "=?utf-8?q?Evil?="),
}


@pytest.fixture
def merge_issue(tmp_path):
    path = tmp_path / EXAMPLE.name
    text = EXAMPLE.read_text(encoding="utf-8")
    subject_line = next(line for line in text.splitlines() if line.startswith("subject:"))
    path.write_text(text.replace(subject_line, f'subject: "{SUBJECT}"'), encoding="utf-8")
    return path


def add_people(config):
    with Store(config.store.path) as store:
        for address, (name, fields, *_) in PEOPLE.items():
            store.add(Recipient(address, name, fields), "test")


def greeting(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("Hi "))


def assert_merged(address, subject, text, markup):
    _, _, want_subject, want_name = PEOPLE[address]
    assert subject == want_subject, address
    assert greeting(text) == f"Hi {want_name},", address
    assert f">Hi {html.escape(want_name)},</div>" in markup, address
    assert "{{m:" not in subject + text + markup and "%recipient.m" not in text + markup, address


# -- the syntax ----------------------------------------------------------------------------------

@pytest.mark.parametrize("subject, message", [
    ("Hi {{name|a|b}}", "one '|' only"),
    ("Hi {{name", "'{{' is not closed"),
    ("Hi name}}", "'}}' without an opening"),
    ("Hi {{}}", "expected a field name"),
    ("Hi {{|there}}", "expected a field name"),
    ("Hi {{na{me}}", "'{{' is not closed"),
])
def test_a_malformed_merge_field_in_the_subject_is_reported_with_its_line(write_issue, subject, message):
    path = write_issue(MINIMAL.replace("subject: A small issue", f'subject: "{subject}"'))
    result = load_issue(path)
    assert result.issue is None
    [problem] = result.errors
    assert (problem.path, problem.line, problem.field) == (str(path), 1, "subject")
    assert message in problem.message
    cli = run_cli("check", path, cwd=ROOT)
    assert cli.returncode == 1 and f"{path}:1:10: subject: merge field" in cli.stderr


def test_a_malformed_merge_field_in_the_preheader_is_reported_too(write_issue):
    path = write_issue(MINIMAL.replace("preheader: What this issue is about.", "preheader: Hi {{name"))
    [problem] = load_issue(path).errors
    assert (problem.line, problem.field) == (3, "preheader")


def test_rendering_leaves_placeholders_and_the_web_page_shows_the_fallbacks(config, write_issue):
    path = write_issue(MINIMAL.replace("subject: A small issue", 'subject: "{{name|Friend}} & co"')
                       .replace("preheader: What this issue is about.", "preheader: For {{city|<you>}}"))
    rendered = Renderer(config).render(read_issue(path))
    assert rendered.merges == (("name", "Friend"), ("city", "<you>"), ("name", "there"))
    assert rendered.subject == "{{m:0}} & co" and rendered.preheader == "For {{m:1}}"
    assert "<title>{{m:0}} &amp; co</title>" in rendered.html
    assert "For {{m:1}}" in rendered.html and "Hi {{m:2}}," in rendered.html and "Hi {{m:2}}," in rendered.text
    assert "{{m:" not in rendered.web_html and "<title>Friend &amp; co</title>" in rendered.web_html


@pytest.mark.parametrize("template, message", [
    ('{% if subscriber.name %}Hi{% endif %}', "cannot be tested here"),
    ('{{ subscriber.name | upper }}', "a filter other than default"),
])
def test_a_merge_field_used_as_a_value_at_render_time_is_a_template_error(project, template, message):
    text = project / "templates" / "email.txt"
    text.write_text(text.read_text(encoding="utf-8").replace("Unsubscribe:", template + "\nUnsubscribe:"),
                    encoding="utf-8")
    result = run_cli("build", cwd=project)
    assert result.returncode == 2 and message in result.stderr
    if "if" in template:
        assert "email.txt:" in result.stderr


def test_a_proof_shows_the_fallbacks(config, merge_issue):
    signer = Signer(b"s", "l")
    factory = MessageFactory(Renderer(config).render(read_issue(merge_issue)), config, signer, test_send=True)
    data = factory.build("me@example.com", None, signer.recipient_key("me@example.com")).data
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message["Subject"] == "[TEST] Reader, news for your town"
    assert greeting(message.get_body(("plain",)).get_content()) == "Hi there,"


# -- real sends --------------------------------------------------------------------------------------

def test_each_recipient_gets_their_own_merged_message_in_the_outbox(tmp_path, merge_issue):
    config = config_for({"NEWSLETTER_SECRET": "s", "NEWSLETTER_DESIGN_TEMPLATES": str(ROOT / "templates"),
                         "NEWSLETTER_STORE_PATH": str(tmp_path / "store.sqlite3"),
                         "NEWSLETTER_SEND_OUTBOX": str(tmp_path / "outbox")})
    add_people(config)
    assert send_issue(merge_issue, config).this_run["sent"] == len(PEOPLE)
    for address in PEOPLE:
        data = (tmp_path / "outbox" / merge_issue.stem / f"{address}.eml").read_bytes()
        head = data.split(b"\r\n\r\n", 1)[0]
        assert head.isascii() and head.count(b"\r\nSubject:") == 1 and not re.search(rb"(^|\n)Bcc:", head)
        message = email.message_from_bytes(data, policy=email.policy.default)
        assert message["Bcc"] is None and len(message.get_all("Subject")) == 1
        text = message.get_body(("plain",)).get_content()
        markup = message.get_body(("html",)).get_content()
        assert_merged(address, str(message["Subject"]), text, markup)


@pytest.mark.parametrize("provider", ["sendgrid", "mailgun", "postmark", "resend", "ses"])
def test_each_recipient_gets_their_own_merged_message_through_the_api(tmp_path, merge_issue, provider):
    with ApiServer() as server:
        config = config_for(api_env(tmp_path, server, provider))
        add_people(config)
        assert send_issue(merge_issue, config).this_run["sent"] == len(PEOPLE)
        assert server.delivered() == {a: 1 for a in PEOPLE}
        for r in server.received:  # the subject as the provider takes it: plain UTF-8 (SES: decoded MIME)
            assert_merged(r.address, r.subject, r.text, r.html)
            assert "<b>" not in r.html.replace("<b>Ann", "")  # the name's markup never arrives as markup


def test_a_subject_without_merge_fields_is_shared_by_every_message(config):
    signer = Signer(b"s", "l")
    factory = MessageFactory(Renderer(config).render(read_issue(EXAMPLE)), config, signer)
    assert not factory.subject_merged and b"Subject:" in factory.common_headers
    assert factory.text.slots == [1, 0] and factory.html.slots == [1, 0]  # the greeting, the unsubscribe link
    key = signer.recipient_key("a@example.com")
    assert "Hi Ana," in factory.build("a@example.com", "Ana", key).html
    assert "Hi there," in factory.build("a@example.com", "", key).html


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


# -- export and import ----------------------------------------------------------------------------

def dump(folder) -> tuple[list, list]:
    db = sqlite3.connect(folder / "newsletter.sqlite3")
    try:
        return (db.execute("SELECT email, name, fields, status, changed_at, changed_how FROM subscribers"
                           " ORDER BY email").fetchall(),
                db.execute("SELECT email, reason, created_at FROM suppressions ORDER BY email").fetchall())
    finally:
        db.close()


def test_export_then_import_into_a_new_store_reproduces_it_exactly(project, tmp_path_factory):
    with Store(project / "newsletter.sqlite3") as store:
        store.add(Recipient("ana@example.com", "Ana", {"city": "Lisbon", "plan": "pro"}), "import a.csv")
        store.add(Recipient("bob@example.com", "Bob", {"city": "", "plan": "free"}), "import a.csv")
        store.add(Recipient("cy@example.com"), "cli add")  # no fields at all
        store.add(Recipient("-dee@example.com", "=HYPERLINK(\"http://x\")", {"phone": "+44 20 1234", "note": "'quoted"}),
                  "import b.csv")
        store.add(Recipient("eve@example.com", "Eve", {"=cmd": "@SUM(A1)", "Zoë's": "ü, \"x\"\nnext"}), "import c.csv")
        store.set_status("bob@example.com", "unsubscribed", "one-click")
        store.set_status("eve@example.com", "bounced", "send 550 5.1.1")
        store.suppress("eve@example.com", "550 5.1.1 no such user")
        store.suppress("Gone@Example.com", "complaint", "2023-01-02T03:04:05+00:00")  # no subscriber
        store.suppress("+x@example.com", "-manual")
    exported = run_cli("subscribers", "export", "--out", "export.csv", cwd=project)
    assert exported.returncode == 0, exported.stderr
    text = (project / "export.csv").read_text(encoding="utf-8")
    # no cell starts as a spreadsheet formula would
    cells = [c for row in csv.reader(io.StringIO(text)) for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert "'=HYPERLINK" in text and "'-dee@example.com" in text and "'+44 20 1234" in text and "''quoted" in text

    other = tmp_path_factory.mktemp("other")
    shutil.copy(ROOT / "newsletter.toml", other)
    shutil.copy(project / "export.csv", other)
    imported = run_cli("subscribers", "import", "export.csv", cwd=other)
    assert imported.returncode == 0, imported.stderr
    assert "3 suppressions kept" in imported.stdout
    assert dump(other) == dump(project)
    assert run_cli("subscribers", "export", cwd=other).stdout.replace("\r\n", "\n") == text.replace("\r\n", "\n")


def test_a_bad_absent_fields_cell_or_time_is_named_with_its_row(project):
    (project / "x.csv").write_text("email,city,absent_fields,changed_at\n"
                                   "a@example.com,X,[\"nope\"],\n"
                                   "b@example.com,Y,,yesterday\n"
                                   "c@example.com,Z,[],2024-01-01T00:00:00+00:00\n", encoding="utf-8")
    result = run_cli("subscribers", "import", "x.csv", cwd=project)
    assert result.returncode == 1
    assert "x.csv:2: skipped" in result.stderr and "x.csv:3: skipped 'yesterday'" in result.stderr
    assert [row[0] for row in dump(project)[0]] == ["c@example.com"]
