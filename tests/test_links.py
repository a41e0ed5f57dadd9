"""`check --links` against a real HTTP server on loopback: every answer a link can get,
the cache, and a machine with no network. No traffic ever leaves the machine: the
unreachable hosts are loopback addresses with nothing listening."""

import asyncio
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from conftest import ROOT, run_cli
from newsletter.build import LinkOptions, check_paths
from newsletter.links import (NO_NETWORK, Cache, Outcome, _failure, check_links, fetch_all, issue_links,
                              looks_offline)
from newsletter.reader import read_issue


class Site(BaseHTTPRequestHandler):
    """/ok 200; /moved 301 and /temp 302 to /ok; /missing 404; /error 500; /nohead 405 to a
    HEAD and 200 to a GET; /hang answers nothing until the test ends."""

    def _answer(self):
        self.server.requests[(self.command, self.path)] += 1
        path = self.path
        if path == "/hang":
            self.server.release.wait(30)
            return
        if path.startswith("/slow"):  # held a moment, so that requests overlap if allowed to
            with self.server.lock:
                self.server.in_flight += 1
                self.server.most = max(self.server.most, self.server.in_flight)
            self.server.release.wait(0.3)
            with self.server.lock:
                self.server.in_flight -= 1
            path = "/ok"
        if path in ("/moved", "/temp"):
            self.send_response(301 if path == "/moved" else 302)
            self.send_header("Location", "/ok")
        elif path == "/nohead" and self.command == "HEAD":
            self.send_response(405)
        else:
            self.send_response({"/ok": 200, "/nohead": 200, "/missing": 404, "/error": 500}.get(path, 404))
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def site():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    server.daemon_threads = True
    server.requests, server.release = Counter(), threading.Event()
    server.lock, server.in_flight, server.most = threading.Lock(), 0, 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def url(server, path):
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def closed_port(host="127.0.0.1"):
    """A port on `host` with nothing listening."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


ISSUE = """\
subject: Links of every kind
date: 2024-03-01
preheader: Which of them still work?
lead:
  source: Example News
  title: Something happened
  url: {ok}
  image:
    url: {nohead}
    alt: A picture
    width: 300
  body: |
    First paragraph with [a moved page]({moved}).

    Second paragraph, [gone]({missing}), and [mail](mailto:editor@example.com).
related:
  - source: A
    title: Broken server
    url: {error}
    summary: |
      Takes [forever]({hang}).
  - source: B
    title: Temporarily elsewhere
    url: {temp}
"""


def write(tmp_path, server, **extra):
    paths = {k: url(server, "/" + k) for k in ("ok", "nohead", "moved", "missing", "error", "hang", "temp")}
    path = tmp_path / "links.yaml"
    path.write_text(ISSUE.format(**{**paths, **extra}), encoding="utf-8")
    return path


def test_every_link_is_found_with_its_line(tmp_path, site):
    issue = read_issue(write(tmp_path, site))
    found = [(r.line, r.field, r.url.rsplit("/", 1)[-1]) for r in issue_links(issue)]
    assert found == [(7, "lead.url", "ok"), (9, "lead.image.url", "nohead"), (13, "lead.body", "moved"),
                     (15, "lead.body", "missing"), (19, "related[0].url", "error"),
                     (21, "related[0].summary", "hang"), (24, "related[1].url", "temp")]


def test_broken_links_are_warnings_with_their_lines(tmp_path, site, config):
    path = write(tmp_path, site)
    report = check_paths([path], config, links=LinkOptions(timeout=1.0, cache=Cache(tmp_path / "links.json")))
    assert report.errors == []
    got = {(p.line, p.field): p.message for p in report.warnings if "plain http" not in p.message}
    assert set(got) == {(13, "lead.body"), (15, "lead.body"), (19, "related[0].url"), (21, "related[0].summary")}
    assert got[(13, "lead.body")] == (f"link {url(site, '/moved')} has moved permanently to {url(site, '/ok')}; "
                                      "link there instead")
    assert got[(15, "lead.body")] == f"broken link {url(site, '/missing')}: HTTP 404"
    assert got[(19, "related[0].url")] == f"broken link {url(site, '/error')}: HTTP 500"
    assert got[(21, "related[0].summary")] == f"broken link {url(site, '/hang')}: timed out"
    # A temporary redirect is said, but is nothing to fix.
    assert report.notes == [f"{path}:24:10: related[1].url: link {url(site, '/temp')} redirects (temporarily) "
                            f"to {url(site, '/ok')}"]
    # HEAD refused with 405: asked again with GET, which answered 200.
    assert site.requests[("HEAD", "/nohead")] == 1 and site.requests[("GET", "/nohead")] == 1
    assert site.requests[("GET", "/ok")] == 0  # a HEAD was enough
    assert not report.failed() and report.failed(strict=True)


def test_a_second_run_within_the_hour_fetches_only_the_broken_links(tmp_path, site, config):
    path = write(tmp_path, site, hang=url(site, "/ok"))
    cache_file = tmp_path / "links.json"
    first = check_paths([path], config, links=LinkOptions(timeout=5.0, cache=Cache(cache_file)))
    assert cache_file.is_file()
    before = site.requests.copy()
    second = check_paths([path], config, links=LinkOptions(timeout=5.0, cache=Cache(cache_file)))
    assert second.problems == first.problems and second.notes == first.notes
    asked = site.requests - before
    # Only the two broken links were asked again; the good, moved and redirected ones came from the cache.
    assert asked == Counter({("HEAD", "/missing"): 1, ("HEAD", "/error"): 1})
    # An hour later the cache is stale: every link is fetched again.
    stale = Cache(cache_file, max_age=0)
    check_paths([path], config, links=LinkOptions(timeout=5.0, cache=stale))
    assert (site.requests - before - asked)[("HEAD", "/ok")] >= 1


def test_no_network_is_said_once_instead_of_every_link_broken(tmp_path, config):
    # Three loopback hosts with nothing listening: what a machine without a network sees.
    hosts = [f"http://127.0.0.{n}:{closed_port(f'127.0.0.{n}')}" for n in (1, 2, 3)]
    path = tmp_path / "offline.yaml"
    path.write_text(ISSUE.format(ok=hosts[0] + "/a", nohead=hosts[1] + "/b", moved=hosts[2] + "/c",
                                 missing=hosts[0] + "/d", error=hosts[1] + "/e", hang=hosts[2] + "/f",
                                 temp=hosts[0] + "/g"), encoding="utf-8")
    report = check_paths([path], config, links=LinkOptions(timeout=5.0, cache=Cache(tmp_path / "links.json")))
    assert report.notes == [NO_NETWORK]
    assert not any("broken link" in p.message for p in report.problems)


def test_one_dead_host_is_a_broken_link_when_others_answer(tmp_path, site, config):
    dead = f"http://127.0.0.2:{closed_port('127.0.0.2')}/x"
    path = write(tmp_path, site, missing=dead)
    report = check_paths([path], config, links=LinkOptions(timeout=1.0, cache=Cache(tmp_path / "links.json")))
    assert f"broken link {dead}: connection refused" in [p.message for p in report.problems if p.line == 15]
    assert NO_NETWORK not in report.notes


def test_a_single_unreachable_host_asks_the_routing_table(tmp_path):
    dead = f"http://127.0.0.1:{closed_port()}/"
    path = tmp_path / "one.yaml"
    path.write_text(f"subject: One link\ndate: 2024-03-01\npreheader: Just one.\nlead:\n  source: A\n"
                    f"  title: B\n  url: {dead}\n  body: Text.\n", encoding="utf-8")
    issue = read_issue(path)
    offline = check_links([issue], cache=Cache(None), route_out=lambda: False)
    assert offline.notes == [NO_NETWORK] and offline.problems == []
    online = check_links([issue], cache=Cache(None), route_out=lambda: True)
    assert [(p.line, p.field, p.message) for p in online.problems] == [
        (7, "lead.url", f"broken link {dead}: connection refused")]


def test_the_no_network_decision():
    def failed(host, unreachable=True):
        return Outcome(f"https://{host}/", failure="x", unreachable=unreachable)

    never = lambda: pytest.fail("the routing table need not be asked")  # noqa: E731
    assert looks_offline([failed("a.invalid"), failed("b.invalid")], never)
    assert not looks_offline([failed("a.invalid"), Outcome("https://b.invalid/", 200)], never)
    assert not looks_offline([failed("a.invalid"), failed("b.invalid", unreachable=False)], never)  # a timeout
    assert not looks_offline([], never)
    assert looks_offline([failed("a.invalid"), failed("a.invalid")], lambda: False)
    assert not looks_offline([failed("a.invalid")], lambda: True)


def test_failures_are_named():
    dns = httpx.ConnectError("[Errno -2] Name or service not known")
    dns.__cause__ = socket.gaierror(-2, "Name or service not known")
    assert _failure(dns) == ("DNS lookup failed (no such host)", True)
    assert _failure(httpx.ReadTimeout("read")) == ("timed out", False)


def test_check_links_on_the_command_line(tmp_path, site):
    path = write(tmp_path, site, hang=url(site, "/ok"))
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = run_cli("check", "--links", "--link-timeout", "5", "--config", ROOT / "newsletter.toml", path, env=env)
    assert result.returncode == 0, result.stderr
    assert f"{path}:15:1: warning: lead.body: broken link {url(site, '/missing')}: HTTP 404" in result.stderr
    assert "redirects (temporarily)" in result.stderr
    assert (tmp_path / "cache" / "newsletter" / "links.json").is_file()
    strict = run_cli("check", "--links", "--strict", "--config", ROOT / "newsletter.toml", path, env=env)
    assert strict.returncode == 1 and "check failed" in strict.stderr
    assert "--links" in run_cli("check", "--help").stdout


def test_at_most_two_requests_at_once_to_one_host(site):
    urls = [url(site, f"/slow{i}") for i in range(6)]
    outcomes = asyncio.run(fetch_all(urls, timeout=10.0, limit=8, per_host=2))
    assert [o.status for o in outcomes.values()] == [200] * 6
    assert site.most == 2
    site.most = 0
    asyncio.run(fetch_all(urls, timeout=10.0, limit=3, per_host=5))
    assert site.most == 3  # the overall limit
