"""``newsletter preview``: the rendered issue in a local web page that follows the files.

One page shows the email at desktop width, at phone width, in dark mode, its plain-text
part and the headers a sample recipient's message carries (built by message.MessageFactory,
as `send` builds them). watchfiles watches the issue file, the templates and the settings
file; each change renders the issue again and tells the page over Server-Sent Events, and
the page fetches /state and swaps what changed in. An invalid file or a broken template is
shown in the page with its file:line while the server keeps running.

    GET /         the page
    GET /state    the current rendering (or its problems) as JSON
    GET /events   text/event-stream: one "data: VERSION" each time the rendering changes

Dark mode inside an iframe cannot be chosen by the page around it (the frame follows the
viewer's system), so each frame gets a copy of the email whose ``prefers-color-scheme: dark``
media queries are pinned: always true in the dark frame, never in the light ones.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .config import CONFIG_FILE, Config, load_config
from .errors import ConfigError, IssueError, NewsletterError

SAMPLE_EMAIL = "reader@example.com"
SAMPLE_NAME = "Sample Reader"


@dataclass
class Sample:
    """The issue as one sample recipient gets it."""
    stem: str
    subject: str
    html: str
    text: str
    headers: str  # the message's header block, unfolded lines as sent


def sample(issue_path: str | Path, config: Config) -> Sample:
    """Read and render the issue and build one message for a sample recipient; IssueError
    with every problem, TemplateError, ConfigError as the other commands raise them."""
    from .reader import load_issue
    from .render import Renderer

    result = load_issue(issue_path)
    if result.issue is None or result.errors:
        raise IssueError(result.errors or result.problems)
    return sample_of(Renderer(config).render(result.issue), config)


def sample_of(rendered, config: Config) -> Sample:
    from .message import MessageFactory
    from .sender import make_signer

    # A one-off secret when none is set: the preview never delivers, so its token need not verify.
    signer = make_signer(config, allow_ephemeral=True, warnings=[])
    message = MessageFactory(rendered, config, signer).build(SAMPLE_EMAIL, SAMPLE_NAME, "preview")
    data = message.data
    head = data[:data.find(b"\r\n\r\n")].decode("ascii", "replace")
    return Sample(rendered.issue.stem, message.subject, message.html, message.text, head.replace("\r\n", "\n"))


_DARK_QUERY = re.compile(r"\(\s*prefers-color-scheme\s*:\s*dark\s*\)", re.I)


def pin_scheme(html: str, dark: bool) -> str:
    """The email with its dark-mode media queries made always (dark) or never (light) true."""
    return _DARK_QUERY.sub("(min-width: 0px)" if dark else "(max-width: 0px)", html)


# --- the state the page shows -----------------------------------------------------------------


@dataclass
class Preview:
    """Renders the issue on demand and remembers the latest result for the page."""
    issue_path: Path
    config_path: Path
    version: int = 0
    state: dict = field(default_factory=dict)
    _renderer: object = None
    _config_key: object = None

    def watched(self) -> tuple[list[Path], list[Path]]:
        """(folders watched alone, folders watched with their subfolders): the issue's and
        the settings file's alone (the project root may hold a .venv of thousands of
        folders), the templates' whole."""
        flat = {self.issue_path.resolve().parent, self.config_path.resolve().parent}
        deep = set()
        try:
            deep.add(load_config(self.config_path).design.templates.resolve())
        except NewsletterError:
            pass
        return sorted(p for p in flat - deep if p.is_dir()), sorted(p for p in deep if p.is_dir())

    def relevant(self, path: str) -> bool:
        p = Path(path)
        if p.name.startswith(".") or p.name.endswith("~"):  # editors' swap and backup files
            return False
        if p.resolve() in (self.issue_path.resolve(), self.config_path.resolve()):
            return True
        try:
            templates = load_config(self.config_path).design.templates.resolve()
        except NewsletterError:
            return False
        return templates in p.resolve().parents

    def refresh(self) -> dict:
        """Render again; the state is the new rendering or its problems."""
        try:
            state = self._render()
        except IssueError as exc:
            state = {"ok": False, "problems": [_problem(p) for p in exc.problems]}
        except ConfigError as exc:
            state = {"ok": False, "problems": [{"where": "", "message": m} for m in exc.messages]}
        except NewsletterError as exc:
            state = {"ok": False, "problems": [_where_message(line) for line in str(exc).splitlines() if line]}
        except Exception as exc:  # keep serving whatever broke; the page says what
            state = {"ok": False, "problems": [{"where": "", "message": f"{type(exc).__name__}: {exc}"}]}
        self.version += 1
        state["version"] = self.version
        state["issue"] = str(self.issue_path)
        if not state["ok"] and "light" in self.state:
            # the page keeps showing the last good rendering under the problems
            state.update({k: self.state[k] for k in GOOD_KEYS}, stale=True)
        self.state = state
        return state

    def _render(self) -> dict:
        from .reader import load_issue
        from .render import Renderer

        config = load_config(self.config_path)
        key = repr(config)
        if self._renderer is None or key != self._config_key:
            # one Renderer while the settings stay the same: Jinja re-reads changed templates
            # itself and premailer stays warm
            self._renderer, self._config_key = Renderer(config), key
        result = load_issue(self.issue_path)
        if result.issue is None or result.errors:
            raise IssueError(result.errors or result.problems)
        s = sample_of(self._renderer.render(result.issue), config)
        warnings = [_problem(p) for p in result.problems if not p.is_error]
        good = {"subject": s.subject, "light": pin_scheme(s.html, False), "dark": pin_scheme(s.html, True),
                "text": s.text, "headers": s.headers}
        return {"ok": True, "problems": warnings, **good}


def _problem(p) -> dict:
    where = f"{p.path}:{p.line}" + (f":{p.col}" if p.col else "") if p.line else str(p.path)
    field_ = f"{p.field}: " if p.field else ""
    return {"where": where, "message": ("" if p.is_error else "warning: ") + field_ + p.message}


GOOD_KEYS = ("subject", "light", "dark", "text", "headers")

_WHERE = re.compile(r"^(\S+?:\d+(?::\d+)?): (.*)$")


def _where_message(line: str) -> dict:
    m = _WHERE.match(line)
    return {"where": m[1], "message": m[2]} if m else {"where": "", "message": line}


# --- the web app --------------------------------------------------------------------------------


def make_app(preview: Preview, watch: bool = True):
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    changed = asyncio.Event()  # replaced after each broadcast; waiters hold the old one
    events = {"current": changed}
    stopping = asyncio.Event()

    lock = asyncio.Lock()  # one rendering at a time, whichever watcher saw the change

    async def rebuild():
        async with lock:
            await asyncio.to_thread(preview.refresh)
            old, events["current"] = events["current"], asyncio.Event()
            old.set()

    async def watch_folders(folders: list[Path], recursive: bool):
        import watchfiles

        # Rust's notify underneath: no polling loop of ours; step groups an editor's burst of writes.
        async for _ in watchfiles.awatch(*folders, watch_filter=lambda _c, p: preview.relevant(p),
                                         stop_event=stopping, step=30, debounce=400, recursive=recursive):
            await rebuild()

    async def watcher():
        flat, deep = preview.watched()
        jobs = [watch_folders(f, r) for f, r in ((flat, False), (deep, True)) if f]
        await asyncio.gather(*jobs)

    async def page(request):
        return HTMLResponse(PAGE)

    async def state(request):
        return JSONResponse(preview.state, headers={"Cache-Control": "no-store"})

    async def stream(request):
        async def lines():
            seen = -1
            yield "retry: 500\n\n"
            while not stopping.is_set():
                if preview.state.get("version", 0) != seen:
                    seen = preview.state.get("version", 0)
                    yield f"data: {seen}\n\n"
                    continue
                waiting = events["current"]
                try:
                    await asyncio.wait_for(waiting.wait(), timeout=15)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"  # also finds a closed connection
        return StreamingResponse(lines(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(preview.refresh)
        task = asyncio.create_task(watcher()) if watch else None
        try:
            yield
        finally:
            stopping.set()
            events["current"].set()
            if task:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass

    return Starlette(routes=[
        Route("/", page),
        Route("/state", state),
        Route("/events", stream),
    ], lifespan=lifespan)


def run_preview(issue_path: Path, config_path: Path | None, host: str, port: int, open_browser: bool = False,
                out=sys.stdout) -> None:
    """Serve the preview until interrupted; prints its URL first."""
    import uvicorn

    config_path = Path(config_path or CONFIG_FILE)
    load_config(config_path)  # settings that cannot be read at all: say so now, not in the page
    if not Path(issue_path).is_file():
        raise NewsletterError(f"{issue_path}: no such issue file")
    preview = Preview(Path(issue_path), config_path)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family = infos[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(infos[0][4])
    except OSError as exc:
        raise NewsletterError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(128)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/"
    print(f"previewing {issue_path} at {url} (Ctrl-C to stop)", file=out, flush=True)
    server = uvicorn.Server(uvicorn.Config(make_app(preview), log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=1))
    if open_browser:
        import webbrowser
        threading.Timer(0.5, webbrowser.open, (url,)).start()
    server.run(sockets=[sock])


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Preview</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { margin: 0; font: 14px/1.4 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
         background: #e9e9ec; color: #1d1d1f; }
  header { padding: 8px 16px; background: #fff; border-bottom: 1px solid #ccc; display: flex; gap: 16px;
           align-items: baseline; flex-wrap: wrap; }
  header h1 { font-size: 15px; margin: 0; }
  #subject { font-weight: 600; }
  #status { color: #666; margin-left: auto; }
  #problems { display: none; margin: 12px 16px; padding: 10px 14px; background: #fff1f0;
              border: 2px solid #c62828; border-radius: 6px; color: #7f1212; }
  #problems.shown { display: block; }
  #problems h2 { font-size: 14px; margin: 0 0 6px; }
  #problems li { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
  #problems .where { font-weight: 700; }
  #problems.warnings { background: #fffbe6; border-color: #b7791f; color: #5f4100; }
  nav { display: flex; gap: 4px; padding: 8px 16px 0; }
  nav button { border: 1px solid #bbb; border-bottom: 0; background: #f6f6f6; padding: 6px 12px;
               border-radius: 6px 6px 0 0; cursor: pointer; font: inherit; }
  nav button[aria-selected=true] { background: #fff; font-weight: 600; }
  main { padding: 16px; background: #fff; border-top: 1px solid #bbb; min-height: 80vh; }
  .panel { display: none; }
  .panel.shown { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
  figure { margin: 0; }
  figcaption { font-size: 12px; color: #555; margin-bottom: 4px; }
  iframe { border: 1px solid #ccc; background: #fff; display: block; height: 80vh; }
  pre { white-space: pre-wrap; font: 13px/1.5 ui-monospace, Menlo, Consolas, monospace; margin: 0;
        max-width: 80ch; }
</style></head>
<body>
<header><h1>Preview</h1><span id="subject"></span><span id="status">connecting...</span></header>
<section id="problems" role="alert"><h2 id="problems-title">Problems</h2><ul id="problem-list"></ul></section>
<nav role="tablist">
  <button role="tab" aria-selected="true" data-panel="email">Email</button>
  <button role="tab" aria-selected="false" data-panel="text">Plain text</button>
  <button role="tab" aria-selected="false" data-panel="headers">Headers</button>
</nav>
<main>
  <div class="panel shown" id="email">
    <figure><figcaption>Desktop, 800 px</figcaption><iframe id="desktop" title="desktop" style="width: 800px"></iframe></figure>
    <figure><figcaption>Phone, 375 px</figcaption><iframe id="phone" title="phone" style="width: 375px"></iframe></figure>
    <figure><figcaption>Dark mode, 375 px</figcaption><iframe id="dark" title="dark mode" style="width: 375px"></iframe></figure>
  </div>
  <div class="panel" id="text"><pre id="text-part"></pre></div>
  <div class="panel" id="headers"><pre id="header-block"></pre></div>
</main>
<script>
"use strict";
var shown = {version: 0};
document.querySelectorAll("nav button").forEach(function (b) {
  b.addEventListener("click", function () {
    document.querySelectorAll("nav button").forEach(function (o) { o.setAttribute("aria-selected", String(o === b)); });
    document.querySelectorAll(".panel").forEach(function (p) { p.classList.toggle("shown", p.id === b.dataset.panel); });
  });
});
function frame(id, html) {
  var f = document.getElementById(id);
  if (f.dataset.html === html) return;
  f.dataset.html = html;
  var y = f.contentWindow ? f.contentWindow.scrollY : 0;
  f.onload = function () { f.contentWindow.scrollTo(0, y); };
  f.srcdoc = html;
}
function show(state) {
  if (state.version <= shown.version) return;
  shown = state;
  var box = document.getElementById("problems"), list = document.getElementById("problem-list");
  list.textContent = "";
  (state.problems || []).forEach(function (p) {
    var li = document.createElement("li"), w = document.createElement("span");
    w.className = "where"; w.textContent = p.where ? p.where + ": " : "";
    li.appendChild(w); li.appendChild(document.createTextNode(p.message));
    list.appendChild(li);
  });
  box.classList.toggle("shown", (state.problems || []).length > 0);
  box.classList.toggle("warnings", state.ok);
  document.getElementById("problems-title").textContent = state.ok ? "Warnings" :
    state.stale ? "The issue cannot be rendered (below: the last good version)" : "The issue cannot be rendered";
  document.body.dataset.version = state.version;
  document.body.dataset.ok = state.ok;
  if (state.light === undefined) return;
  document.getElementById("subject").textContent = state.subject;
  document.title = "Preview: " + state.subject;
  frame("desktop", state.light); frame("phone", state.light); frame("dark", state.dark);
  document.getElementById("text-part").textContent = state.text;
  document.getElementById("header-block").textContent = state.headers;
}
function load() {
  return fetch("/state", {cache: "no-store"}).then(function (r) { return r.json(); }).then(show);
}
var events = new EventSource("/events");
events.onmessage = function (e) {
  document.getElementById("status").textContent = "live";
  if (Number(e.data) > shown.version) load();
};
events.onerror = function () { document.getElementById("status").textContent = "reconnecting..."; };
</script>
</body></html>
"""
