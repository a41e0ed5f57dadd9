"""`newsletter archive`: the static site of every issue, its Atom feed and the sign-up form.

Three issues (the example and two variations, one with merge fields in its subject and
preheader, two on the same day) are archived by the CLI as a user runs it. The index is read
with lxml, the feed with feedparser (an independent Atom parser) and ElementTree, the pages
are laid out in headless Chromium (tests/browser.py), the site is served by a real HTTP
server on loopback to follow its links, and the "view in your browser" link is taken from a
message the outbox really wrote.
"""

from __future__ import annotations

import email
import email.policy
import functools
import http.server
import os
import re
import shutil
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urljoin

import feedparser
import httpx
import lxml.html
import pytest

import browser  # tests/browser.py
from conftest import EXAMPLE, ROOT, run_cli

BASE = "https://watchman.example/issues"  # newsletter.toml's base_url
PUBLIC = "https://news.watchman.example"
ENV = {"NEWSLETTER_SERVE_PUBLIC_URL": PUBLIC}
ATOM = "{http://www.w3.org/2005/Atom}"
PHONE = 375
SCREENSHOTS = ROOT / "tests" / "artifacts" / "screenshots"

SECOND = "2021-08-20-second"  # same day as THIRD; later by name, so listed first
THIRD = "2021-08-20-alpha"
FIRST = EXAMPLE.stem  # 2021-08-13
NEWEST_FIRST = [SECOND, THIRD, FIRST]
SUBJECTS = {
    FIRST: "China is ready to recognize a Taliban-run Afghanistan",
    SECOND: "Reader, the second brief",  # {{name|Reader}} on the web
    THIRD: "Third & <last> issue",
}
PREHEADERS = {
    FIRST: "Beijing prepares to formalize ties with the Taliban as Kabul's defences fall, "
           "undercutting Washington's last leverage.",
    SECOND: "What you missed this week, friend.",
    THIRD: "Markup <b>stays</b> text.",
}


def vary(text: str, subject: str, date: str, number: int, preheader: str) -> str:
    text, n = re.subn(r"(?m)^subject: .*$", f"subject: {subject}", text, count=1)
    text, m = re.subn(r"(?m)^date: .*$", f"date: {date}", text, count=1)
    text, k = re.subn(r"(?m)^number: .*$", f"number: {number}", text, count=1)
    text, p = re.subn(r"(?ms)^preheader: >-\n(  .*?\n)+", f"preheader: {preheader}\n", text, count=1)
    assert (n, m, k, p) == (1, 1, 1, 1), "the example issue's layout changed; update vary()"
    return text


def make_project(folder: Path) -> Path:
    shutil.copy(ROOT / "newsletter.toml", folder)
    shutil.copytree(ROOT / "templates", folder / "templates")
    issues = folder / "issues"
    issues.mkdir()
    shutil.copy(EXAMPLE, issues)
    source = EXAMPLE.read_text(encoding="utf-8")
    (issues / f"{SECOND}.yaml").write_text(vary(source, '"{{name|Reader}}, the second brief"', "2021-08-20", 2,
                                                '"What you missed this week, {{ name | friend }}."'), "utf-8")
    (issues / f"{THIRD}.yaml").write_text(vary(source, '"Third & <last> issue"', "2021-08-20", 3,
                                               '"Markup <b>stays</b> text."'), "utf-8")
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The three issues archived once by the CLI (with a sign-up form); shared by the read-only tests."""
    project = make_project(tmp_path_factory.mktemp("archive"))
    result = run_cli("archive", cwd=project, env=ENV)
    assert result.returncode == 0, result.stderr
    return project, result


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path)


def page_of(site: Path, stem: str) -> str:
    return (site / stem / "index.html").read_text(encoding="utf-8")


# --- the index ----------------------------------------------------------------------------


def test_cli_reports_what_it_wrote(built):
    project, result = built
    assert sorted(files_of(project / "site")) == sorted(
        ["index.html", "feed.xml", *(f"{stem}/index.html" for stem in NEWEST_FIRST)])
    assert "archive of 3 issue(s) in site/: 5 file(s) written, 0 unchanged" in result.stdout
    assert "sign-up form" not in result.stdout  # public_url is set


def test_index_lists_issues_newest_first_with_number_date_subject_and_preheader(built):
    project, _ = built
    raw = (project / "site" / "index.html").read_text(encoding="utf-8")
    doc = lxml.html.fromstring(raw)
    assert doc.get("lang") == "en"
    assert doc.xpath("//meta[@name='viewport']")
    items = doc.xpath("//ol[@class='issues']/li")
    assert [li.xpath(".//h2/a")[0].get("href") for li in items] == [f"{stem}/" for stem in NEWEST_FIRST]
    assert [li.xpath(".//h2/a")[0].text_content() for li in items] == [SUBJECTS[s] for s in NEWEST_FIRST]
    assert [li.xpath(".//p[@class='preheader']")[0].text_content() for li in items] == \
        [PREHEADERS[s] for s in NEWEST_FIRST]
    assert [li.xpath(".//p[@class='meta']")[0].text_content() for li in items] == [
        "Issue 2 · August 20, 2021", "Issue 3 · August 20, 2021", "Issue 1 · August 13, 2021"]
    # Autoescaped: the subject's markup is text, never tags.
    assert "Third &amp; &lt;last&gt; issue" in raw and "<b>stays</b>" not in raw
    assert "{{" not in raw
    # Each link, resolved against the index's URL, is the page's canonical URL.
    index_url = doc.xpath("//link[@rel='canonical']")[0].get("href")
    assert index_url == f"{BASE}/"
    for li, stem in zip(items, NEWEST_FIRST):
        canonical = lxml.html.fromstring(page_of(project / "site", stem)).xpath("//link[@rel='canonical']")
        assert urljoin(index_url, li.xpath(".//h2/a")[0].get("href")) == canonical[0].get("href")
    # The design's accent colour, from newsletter.toml.
    assert "#9f1d20" in raw


# --- the pages ----------------------------------------------------------------------------


def test_pages_are_the_web_version_without_any_personal_part(built, renderer):
    from newsletter.reader import read_issue

    project, _ = built
    for stem in NEWEST_FIRST:
        page = page_of(project / "site", stem)
        rendered = renderer.render(read_issue(project / "issues" / f"{stem}.yaml"))
        # render's web page, whole, with the archive's parts added to its head and body.
        head_end = rendered.web_html.index("</head>")
        body_end = rendered.web_html.rindex("</body>")
        assert page.startswith(rendered.web_html[:head_end])
        assert rendered.web_html[head_end:body_end] in page
        assert page.endswith(rendered.web_html[body_end:])
        doc = lxml.html.fromstring(page)
        assert doc.get("lang") == "en"
        assert [link.get("href") for link in doc.xpath("//link[@rel='canonical']")] == [f"{BASE}/{stem}/"]
        assert doc.xpath("//title")[0].text_content() == SUBJECTS[stem]
        # No unsubscribe link or token, no placeholder of any per-recipient value.
        assert "{{" not in page and "}}" not in page
        assert "/unsubscribe/" not in page and "Unsubscribe" not in page.replace("Subscribe", "")
        assert "View in your browser" not in page and "Hi there," not in page
    assert "Reader, the second brief" in page_of(project / "site", SECOND)


def test_the_emails_view_in_browser_link_is_the_pages_canonical_url(built, tmp_path):
    """A message really written by `send` (outbox) links to the archive page that claims that URL."""
    project, _ = built
    assert run_cli("subscribers", "add", "ann@example.com", "--name", "Ann", cwd=project).returncode == 0
    sent = run_cli("send", f"issues/{SECOND}.yaml", cwd=project, env={"NEWSLETTER_SECRET": "s" * 40})
    assert sent.returncode == 0, sent.stderr
    [eml] = (project / "outbox" / SECOND).glob("*.eml")
    message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    html = message.get_body(("html",)).get_content()
    [view] = re.findall(r'<a href="([^"]+)"[^>]*>View in your browser</a>', html)
    canonical = lxml.html.fromstring(page_of(project / "site", SECOND)).xpath("//link[@rel='canonical']")
    assert view == canonical[0].get("href") == f"{BASE}/{SECOND}/"
    # The reader's own parts of that email are nowhere in the archive.
    token_url = re.search(r"<(https://[^>]+/unsubscribe/[^>]+)>", message["List-Unsubscribe"])[1]
    assert "Ann" in message["Subject"]
    for name, data in files_of(project / "site").items():
        assert token_url.rsplit("/", 1)[1].encode() not in data, name
        assert b"Ann" not in data, name


def test_site_served_at_base_url_links_every_page_by_its_canonical_url(built, tmp_path):
    """The site as a web server serves it: the folder at base_url's path; each index link opens
    the page whose canonical URL is that link."""
    project, _ = built
    root = tmp_path / "www"
    shutil.copytree(project / "site", root / "issues")  # base_url's path is /issues
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    local = f"http://127.0.0.1:{server.server_address[1]}/issues"
    try:
        with httpx.Client(timeout=10) as client:
            index = client.get(f"{local}/")
            assert index.status_code == 200
            hrefs = lxml.html.fromstring(index.text).xpath("//ol[@class='issues']//h2/a/@href")
            assert len(hrefs) == 3
            for href in hrefs:
                url = urljoin(f"{local}/", href)
                page = client.get(url)
                assert page.status_code == 200, url
                [canonical] = lxml.html.fromstring(page.text).xpath("//link[@rel='canonical']/@href")
                assert canonical.replace(BASE, local) == url
            feed = client.get(f"{local}/feed.xml")
            assert feed.status_code == 200 and feedparser.parse(feed.content).entries
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# --- the feed -----------------------------------------------------------------------------


def test_feed_is_atom_read_by_feedparser_with_entries_newest_first(built):
    project, _ = built
    data = (project / "site" / "feed.xml").read_bytes()
    feed = feedparser.parse(data)
    assert not feed.bozo, feed.get("bozo_exception")
    assert feed.version == "atom10"
    assert feed.feed.title == "The Watchman Brief"
    assert feed.feed.id == f"{BASE}/"
    assert feed.feed.updated == "2021-08-20T00:00:00Z"  # the newest issue's date, not the build time
    links = {link.rel: link.href for link in feed.feed.links}
    assert links == {"self": f"{BASE}/feed.xml", "alternate": f"{BASE}/"}
    assert [e.link for e in feed.entries] == [f"{BASE}/{stem}/" for stem in NEWEST_FIRST]
    assert [e.id for e in feed.entries] == [f"{BASE}/{stem}/" for stem in NEWEST_FIRST]
    assert [e.title for e in feed.entries] == [SUBJECTS[stem] for stem in NEWEST_FIRST]
    assert [e.updated for e in feed.entries] == ["2021-08-20T00:00:00Z", "2021-08-20T00:00:00Z",
                                                 "2021-08-13T00:00:00Z"]
    assert [e.summary for e in feed.entries] == [PREHEADERS[stem] for stem in NEWEST_FIRST]
    for entry in feed.entries:
        [content] = entry.content
        assert content.type == "text/html"
        assert "Read more" in content.value and "{{" not in content.value and "Unsubscribe" not in content.value


def test_feed_holds_what_rfc_4287_requires(built):
    project, _ = built
    data = (project / "site" / "feed.xml").read_bytes()
    assert data.startswith(b'<?xml version="1.0" encoding="utf-8"?>\n')
    root = ET.fromstring(data)
    assert root.tag == f"{ATOM}feed"
    rfc3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")

    def one(element, name):
        found = element.findall(f"{ATOM}{name}")
        assert len(found) == 1, f"{element.tag} has {len(found)} atom:{name}"
        return found[0]

    for name in ("id", "title", "updated"):
        assert one(root, name).text
    assert rfc3339.match(one(root, "updated").text)
    assert one(one(root, "author"), "name").text  # entries have no author of their own
    entries = root.findall(f"{ATOM}entry")
    ids = [one(entry, "id").text for entry in entries]
    assert len(set(ids + [one(root, "id").text])) == len(ids) + 1  # all distinct
    for entry in entries:
        assert re.match(r"https://", one(entry, "id").text)
        assert one(entry, "title").text and rfc3339.match(one(entry, "updated").text)
        alternate = [link for link in entry.findall(f"{ATOM}link") if link.get("rel", "alternate") == "alternate"]
        assert len(alternate) == 1 and alternate[0].get("href") == one(entry, "id").text
        assert one(entry, "content").get("type") == "html"


# --- the sign-up form ---------------------------------------------------------------------


def test_signup_form_posts_to_the_service_with_a_labelled_honeypot(built):
    project, _ = built
    for name in ["index.html", f"{FIRST}/index.html"]:
        doc = lxml.html.fromstring((project / "site" / name).read_text(encoding="utf-8"))
        [form] = doc.xpath("//form")
        assert form.get("method") == "post" and form.get("action") == f"{PUBLIC}/subscribe"
        fields = {i.get("name"): i for i in form.xpath(".//input")}
        assert sorted(fields) == ["email", "name", "website"]
        assert fields["email"].get("type") == "email" and fields["email"].get("required") is not None
        assert fields["name"].get("required") is None
        honeypot = fields["website"]
        assert honeypot.get("value") == "" and honeypot.get("tabindex") == "-1"
        [label] = doc.xpath(f"//label[@for='{honeypot.get('id')}']")
        assert label.text_content().strip().lower() == "leave empty"
        assert honeypot.getparent().get("class") == "hp"


def test_without_public_url_no_form_and_a_note(project):
    result = run_cli("archive", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "note: no sign-up form: set [serve] public_url" in result.stdout
    for name, data in files_of(project / "site").items():
        assert b"<form" not in data, name


# --- in Chromium ----------------------------------------------------------------------------


def test_index_and_page_lay_out_at_375px_without_sideways_scroll(built, tmp_path):
    project, _ = built
    chromium = browser.chromium_path()  # skips locally without Chromium; fails under CI=true
    site = project / "site"
    pages = {"index": (site / "index.html").read_text(encoding="utf-8"), "page": page_of(site, THIRD)}
    measured = browser.measure(chromium, {name: browser.Page(html, PHONE) for name, html in pages.items()}, tmp_path)
    for name, m in measured.items():
        assert m["innerWidth"] == PHONE and m["clientWidth"] == PHONE, f"{name}: not measured at {PHONE} px"
        assert m["scrollWidth"] <= PHONE, f"{name}: scrollWidth {m['scrollWidth']}; sticking out: {m['overflowing']}"
        shown = {t["text"]: t for t in m["texts"]}
        assert "Subscribe" in shown, f"{name}: the form was not laid out"
        # The honeypot is in the page for screen readers but takes no room on screen.
        hidden = [t for t in m["texts"] if t["text"] == "Leave empty"]
        assert all(t["box"]["width"] <= 1 for t in hidden), hidden
        small = [(t["text"], t["fontSize"]) for t in m["texts"] if t["fontSize"] < 14 and t["text"] != "Leave empty"]
        assert not small, f"{name}: text under 14 px: {small}"
    index_texts = [t["text"] for t in measured["index"]["texts"]]
    assert [s for s in index_texts if s in SUBJECTS.values()] == [SUBJECTS[s] for s in NEWEST_FIRST]
    assert any(t["text"].startswith("China Prepared to Recognize") for t in measured["page"]["texts"])  # the lead
    for name, html in pages.items():
        shot = browser.screenshot(chromium, html, SCREENSHOTS / f"archive-{name}.png", PHONE,
                                  measured[name]["scrollHeight"], tmp_path)
        assert browser.png_size(shot)[0] == PHONE


# --- determinism and rewriting only what changed --------------------------------------------


def test_the_same_input_gives_the_same_bytes(project):
    assert run_cli("archive", "--out", "one", cwd=project, env=ENV).returncode == 0
    assert run_cli("archive", "--out", "two", cwd=project, env=ENV).returncode == 0
    one, two = files_of(project / "one"), files_of(project / "two")
    assert len(one) == 5 and one == two


def test_only_changed_files_are_rewritten(project):
    site = project / "site"
    assert run_cli("archive", cwd=project, env=ENV).returncode == 0
    # Stamp every file with one old time: a rewrite, however quick, gives it a new one.
    old = 1_000_000_000_000_000_000
    for path in site.rglob("*"):
        os.utime(path, ns=(old, old))
    again = run_cli("archive", cwd=project, env=ENV)
    assert again.returncode == 0
    assert "0 file(s) written, 5 unchanged" in again.stdout
    assert set(mtimes(site).values()) == {old}

    path = project / "issues" / f"{THIRD}.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("Third & <last> issue", "Third, edited"), "utf-8")
    edited = run_cli("archive", cwd=project, env=ENV)
    assert edited.returncode == 0
    assert "3 file(s) written, 2 unchanged" in edited.stdout
    changed = sorted(name for name, ns in mtimes(site).items() if ns != old)
    assert changed == sorted(["index.html", "feed.xml", f"{THIRD}/index.html"])
    assert "Third, edited" in page_of(site, THIRD)


# --- errors and exit codes ------------------------------------------------------------------


def test_errors_are_reported_like_check_and_nothing_is_written(project):
    (project / "issues" / "broken.yaml").write_text("subject: [\n")
    bad_date = EXAMPLE.read_text(encoding="utf-8").replace("date: 2021-08-13", "date: 2021-02-30", 1)
    (project / "issues" / "bad-date.yaml").write_text(bad_date.replace("lead:", "leed: 1\nlead:", 1), "utf-8")
    checked = run_cli("check", cwd=project)
    result = run_cli("archive", cwd=project, env=ENV)
    assert result.returncode == checked.returncode == 1
    problems = [line for line in checked.stderr.splitlines() if line.startswith("issues/")]
    assert len(problems) >= 3  # the YAML error, the date, the unknown key
    assert [line for line in result.stderr.splitlines() if line.startswith("issues/")] == problems
    assert "archive failed: nothing was written to site" in result.stderr
    assert not (project / "site").exists()  # not even the valid issues


def test_an_error_leaves_an_existing_archive_untouched(project):
    assert run_cli("archive", cwd=project, env=ENV).returncode == 0
    before = files_of(project / "site")
    (project / "issues" / "zz.yaml").write_text("subject: fine\n", encoding="utf-8")  # no date, no lead
    path = project / "issues" / f"{THIRD}.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("Third & <last> issue", "Changed"), "utf-8")
    assert run_cli("archive", cwd=project, env=ENV).returncode == 1
    assert files_of(project / "site") == before


def test_an_issue_named_like_the_archives_own_files_is_an_error(project):
    shutil.copy(EXAMPLE, project / "issues" / "feed.xml.yaml")
    result = run_cli("archive", cwd=project)
    assert result.returncode == 1
    assert "issues/feed.xml.yaml: its name would be built onto the archive's own site/feed.xml" in result.stderr
    assert not (project / "site").exists()


def test_no_issue_files_is_exit_1(project):
    (project / "empty").mkdir()
    result = run_cli("archive", "empty", cwd=project)
    assert result.returncode == 1 and "no issue files found in empty" in result.stderr


def test_unwritable_output_is_exit_2(project):
    (project / "site").write_text("a file where the folder should be")
    result = run_cli("archive", cwd=project)
    assert result.returncode == 2 and "cannot write the archive to site" in result.stderr


def test_a_symlink_inside_the_output_cannot_lead_writes_outside(project, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (project / "site").mkdir()
    (project / "site" / FIRST).symlink_to(outside, target_is_directory=True)
    result = run_cli("archive", cwd=project)
    assert result.returncode == 2 and "leads outside site" in result.stderr
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in (project / "site").iterdir()) == [FIRST]  # nothing else written either


def test_a_template_error_is_exit_2_with_its_line(project):
    index = project / "templates" / "archive_index.html.j2"
    index.write_text(index.read_text(encoding="utf-8").replace("{{ publication.name }}", "{{ no_such_name }}", 1))
    result = run_cli("archive", cwd=project)
    assert result.returncode == 2
    assert re.search(r"archive_index\.html\.j2:\d+: 'no_such_name' is undefined", result.stderr), result.stderr
    assert not (project / "site").exists()


def test_a_per_recipient_link_left_on_the_web_page_is_refused(project):
    """A template that shows the unsubscribe link outside the email-only parts would put a
    placeholder (never any reader's token) on the public page: refused, naming the fix."""
    mjml = project / "templates" / "email.mjml"
    text = mjml.read_text(encoding="utf-8")
    text = text.replace("{{ publication.postal_address }}</mj-text>",
                        '{{ publication.postal_address }} <a href="{{ unsubscribe_url }}">Leave</a></mj-text>', 1)
    mjml.write_text(text, encoding="utf-8")
    result = run_cli("archive", cwd=project)
    assert result.returncode == 2
    assert "still holds {{unsubscribe_url}}" in result.stderr and "<!--email-only-->" in result.stderr
    assert not (project / "site").exists()
