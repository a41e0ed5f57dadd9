"""`check --links`: every web link of an issue, fetched concurrently, broken ones reported
with the YAML file:line:col and field they came from.

One request per distinct URL (HEAD; GET when HEAD is refused or answered oddly), at most
`limit` at once and `per_host` to one host, redirects followed. Links found fine are
remembered for an hour in a small JSON file under the user's cache folder, so a second
run right after does not fetch them again; broken ones are always fetched again, since
the author is presumably fixing them.

A machine with no network would make every link look broken: when nothing answered and
every failure was a failed name lookup or connection, to several hosts (or to one host,
and the machine has no route out), the check says "no network" once instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit

import httpx

from . import __version__, markdown
from .errors import WARNING, Problem
from .model import Issue, Markdown

CACHE_SECONDS = 3600
TIMEOUT = 10.0
LIMIT, PER_HOST = 8, 2
PERMANENT = (301, 308)
# HEAD answered like this: the server may not do HEAD properly; ask again with GET.
HEAD_REFUSED = (400, 403, 405, 501)
USER_AGENT = f"newsletter/{__version__} (link check)"

NO_NETWORK = "no network: links not checked"


@dataclass(frozen=True)
class LinkRef:
    """One link as written in an issue file."""

    url: str
    path: str
    line: int
    col: int
    field: str


@dataclass(frozen=True)
class Outcome:
    url: str
    status: int | None = None  # the final HTTP status; None when no answer came
    final_url: str | None = None  # after redirects, when there were any
    permanent: bool = False  # every redirect on the way was permanent (301/308)
    failure: str | None = None  # why there was no answer ("timed out", "DNS lookup failed", ...)
    unreachable: bool = False  # a DNS or connection failure: what no network looks like
    cached: bool = False

    @property
    def broken(self) -> bool:
        return self.failure is not None or (self.status is not None and self.status >= 400)

    def as_json(self) -> dict:
        return {"status": self.status, "final_url": self.final_url, "permanent": self.permanent,
                "checked": time.time()}


@dataclass
class LinkReport:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # said once, not tied to a place
    checked: int = 0  # distinct URLs
    fetched: int = 0  # of those, fetched now rather than taken from the cache
    offline: bool = False


def issue_links(issue: Issue) -> list[LinkRef]:
    """Every http(s) link of the issue, in file order, each with where it was written."""
    refs: list[LinkRef] = []

    def add(url: str, field_path: str, pos_key: str | None = None) -> None:
        if urlsplit(url).scheme.lower() in ("http", "https"):
            line, col = issue.position(pos_key or field_path)
            refs.append(LinkRef(url, issue.path, line, col, field_path))

    def add_markdown(md: Markdown | None, field_path: str) -> None:
        if md is None:
            return
        for i, found in enumerate(markdown.links(md.tokens)):
            if found.kind == "link":
                add(found.url, field_path, f"{field_path}#link{i}")

    add(issue.lead.url, "lead.url")
    if issue.lead.image:
        add(issue.lead.image.url, "lead.image.url")
    add_markdown(issue.lead.body, "lead.body")
    if issue.commentary:
        add_markdown(issue.commentary.body, "commentary.body")
    for i, link in enumerate(issue.related):
        add(link.url, f"related[{i}].url")
        add_markdown(link.summary, f"related[{i}].summary")
    return sorted(refs, key=lambda r: (r.line, r.col))


# -- the cache ----------------------------------------------------------------------------------

def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "newsletter" / "links.json"


class Cache:
    """URL -> the good outcome found less than `max_age` seconds ago."""

    def __init__(self, path: Path | None, max_age: float = CACHE_SECONDS):
        self.path, self.max_age = path, max_age
        self.entries: dict[str, dict] = {}
        if path is None:
            return
        try:
            loaded = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            return  # none yet, or unreadable: start afresh
        now = time.time()
        if isinstance(loaded, dict):
            self.entries = {url: e for url, e in loaded.items()
                            if isinstance(e, dict) and now - float(e.get("checked", 0)) < max_age}

    def get(self, url: str) -> Outcome | None:
        e = self.entries.get(url)
        if e is None:
            return None
        return Outcome(url, e.get("status"), e.get("final_url"), bool(e.get("permanent")), cached=True)

    def put(self, outcome: Outcome) -> None:
        if not outcome.broken:
            self.entries[outcome.url] = outcome.as_json()

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(self.entries), "utf-8")
            os.replace(tmp, self.path)  # a second `check` running at once never reads half a file
        except OSError:
            pass  # a read-only home: no cache, every run fetches


# -- fetching -----------------------------------------------------------------------------------

def _failure(exc: Exception) -> tuple[str, bool]:
    """(what went wrong, in words; whether it looks like no network)."""
    if isinstance(exc, httpx.TimeoutException):
        return "timed out", False
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, socket.gaierror):
            return "DNS lookup failed (no such host)", True
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused", True
        if isinstance(cause, OSError) and cause.errno in (101, 113):  # ENETUNREACH, EHOSTUNREACH
            return "network unreachable", True
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.ConnectError):
        text = str(exc)
        if "Name or service not known" in text or "nodename nor servname" in text or "-2]" in text:
            return "DNS lookup failed (no such host)", True
        if "refused" in text.lower():
            return "connection refused", True
        return f"could not connect: {text or type(exc).__name__}", True
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, False


def _outcome(url: str, response: httpx.Response) -> Outcome:
    if not response.history:
        return Outcome(url, response.status_code)
    permanent = all(r.status_code in PERMANENT for r in response.history)
    return Outcome(url, response.status_code, str(response.url), permanent)


async def _fetch(client: httpx.AsyncClient, url: str) -> Outcome:
    try:
        response = await client.head(url)
        if response.status_code not in HEAD_REFUSED:
            return _outcome(url, response)
    except httpx.TimeoutException as exc:
        return Outcome(url, failure=_failure(exc)[0])
    except (httpx.RemoteProtocolError, httpx.ReadError):
        pass  # some servers drop a HEAD; GET will tell
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: httpx refuses some malformed URLs
        failure, unreachable = _failure(exc)
        return Outcome(url, failure=failure, unreachable=unreachable)
    try:
        async with client.stream("GET", url) as response:  # the status is all we need, not the body
            return _outcome(url, response)
    except (httpx.HTTPError, ValueError) as exc:
        failure, unreachable = _failure(exc)
        return Outcome(url, failure=failure, unreachable=unreachable)


async def fetch_all(urls: Iterable[str], timeout: float = TIMEOUT, limit: int = LIMIT,
                    per_host: int = PER_HOST) -> dict[str, Outcome]:
    urls = list(dict.fromkeys(urls))
    overall = asyncio.Semaphore(limit)
    hosts: dict[str, asyncio.Semaphore] = {}

    async def one(client: httpx.AsyncClient, url: str) -> Outcome:
        host = (urlsplit(url).hostname or "").lower()
        gate = hosts.setdefault(host, asyncio.Semaphore(per_host))
        async with gate, overall:
            return await _fetch(client, url)

    async with httpx.AsyncClient(timeout=timeout, follow_redirects=True, max_redirects=10,
                                 headers={"User-Agent": USER_AGENT}) as client:
        outcomes = await asyncio.gather(*(one(client, url) for url in urls))
    return dict(zip(urls, outcomes))


# -- deciding -----------------------------------------------------------------------------------

def has_route_out() -> bool:
    """Whether the machine has a route to the internet at all. connect() on a UDP socket
    only consults the routing table: no packet is sent (192.0.2.1 is a documentation address)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
        return True
    except OSError:
        return False


def looks_offline(outcomes: Iterable[Outcome], route_out: Callable[[], bool] = has_route_out) -> bool:
    """Nothing answered and every failure was a DNS or connection failure: several hosts all
    failing that way means no network; a single host could just be gone, so then ask the
    routing table."""
    fetched = [o for o in outcomes if not o.cached]
    if not fetched or not all(o.unreachable for o in fetched):
        return False
    hosts = {(urlsplit(o.url).hostname or "").lower() for o in fetched}
    return len(hosts) >= 2 or not route_out()


def check_links(issues: Iterable[Issue], timeout: float = TIMEOUT, limit: int = LIMIT, per_host: int = PER_HOST,
                cache: Cache | None = None, route_out: Callable[[], bool] = has_route_out) -> LinkReport:
    refs = [ref for issue in issues for ref in issue_links(issue)]
    report = LinkReport()
    cache = cache if cache is not None else Cache(cache_path())
    outcomes: dict[str, Outcome] = {}
    for ref in refs:
        if ref.url not in outcomes and (hit := cache.get(ref.url)):
            outcomes[ref.url] = hit
    to_fetch = list(dict.fromkeys(r.url for r in refs if r.url not in outcomes))
    fetched = asyncio.run(fetch_all(to_fetch, timeout, limit, per_host)) if to_fetch else {}
    report.checked, report.fetched = len({r.url for r in refs}), len(fetched)
    if looks_offline(fetched.values(), route_out):
        report.offline = True
        report.notes.append(NO_NETWORK)
        return report
    outcomes.update(fetched)
    for outcome in fetched.values():
        cache.put(outcome)
    cache.save()
    for ref in refs:
        problem, note = describe(outcomes[ref.url])
        if problem:
            report.problems.append(Problem(ref.path, ref.line, ref.col, ref.field, problem, WARNING))
        if note:
            report.notes.append(f"{ref.path}:{ref.line}:{ref.col}: {ref.field}: {note}")
    return report


def describe(o: Outcome) -> tuple[str | None, str | None]:
    """(a problem, a note) about one link's outcome; either may be None."""
    if o.failure:
        return f"broken link {o.url}: {o.failure}", None
    if o.status is not None and o.status >= 400:
        via = f" (redirected to {o.final_url})" if o.final_url else ""
        return f"broken link {o.url}: HTTP {o.status}{via}", None
    if o.final_url and o.permanent:
        return f"link {o.url} has moved permanently to {o.final_url}; link there instead", None
    if o.final_url:
        return None, f"link {o.url} redirects (temporarily) to {o.final_url}"
    return None, None
