"""The service's few HTML pages: small, autoescaped (Jinja2), with headers that keep the
token in the URL from leaking (no Referer, no caching, no framing of the button).

This is a second Jinja environment next to render.py's on purpose: render.py's is built
for MJML email (no autoescape of its own markup, premailer after); these are web pages,
where every value is escaped.
"""

from __future__ import annotations

import functools

from jinja2 import DictLoader, Environment, select_autoescape
from starlette.responses import HTMLResponse

LAYOUT = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{% block title %}{% endblock %} · {{ name }}</title>
<style>
  body { margin: 0; background: #f4f4f2; color: #1a1a1a;
         font: 17px/1.55 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
  main { max-width: 32rem; margin: 3rem auto; padding: 2rem; background: #fff; border-radius: 6px; }
  h1 { font-size: 1.5rem; line-height: 1.25; margin: 0 0 1rem; }
  .kicker { font-size: .85rem; text-transform: uppercase; letter-spacing: .06em; color: #595959; margin: 0 0 .5rem; }
  button { font: inherit; font-weight: 600; color: #fff; background: #1a1a1a; border: 0;
           border-radius: 4px; padding: .7rem 1.4rem; cursor: pointer; }
  @media (prefers-color-scheme: dark) {
    body { background: #121212; color: #eee; } main { background: #1e1e1e; }
    .kicker { color: #b0b0b0; } button { background: #eee; color: #121212; }
  }
</style>
</head>
<body><main>
<p class="kicker">{{ name }}</p>
{% block body %}{% endblock %}
</main></body>
</html>
"""

TEMPLATES = {
    "layout.html": LAYOUT,
    "confirm.html": """{% extends "layout.html" %}{% block title %}Unsubscribe{% endblock %}{% block body %}
<h1>Unsubscribe from {{ name }}?</h1>
<p>You will get no more issues of {{ name }} at this address.</p>
<form method="post">
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit" id="unsubscribe">Unsubscribe</button>
</form>
{% endblock %}""",
    "done.html": """{% extends "layout.html" %}{% block title %}Unsubscribed{% endblock %}{% block body %}
<h1 id="done">You are unsubscribed</h1>
<p>You will get no more issues of {{ name }}. An issue already on its way to you when you
clicked may still arrive; nothing after it will.</p>
{% endblock %}""",
    "invalid.html": """{% extends "layout.html" %}{% block title %}Link not valid{% endblock %}{% block body %}
<h1>This unsubscribe link is not valid</h1>
<p>It may have been cut short or changed on the way. Use the unsubscribe link in the most
recent issue of {{ name }}, copied whole, or reply to that issue and ask to be removed.</p>
{% endblock %}""",
    "unknown.html": """{% extends "layout.html" %}{% block title %}Not found{% endblock %}{% block body %}
<h1>We do not know this subscription</h1>
<p>The link is genuine, but {{ name }} has no record of where it was sent. Reply to the
issue you received and ask to be removed.</p>
{% endblock %}""",
    "unavailable.html": """{% extends "layout.html" %}{% block title %}Try again{% endblock %}{% block body %}
<h1>Please try again in a minute</h1>
<p>{{ name }} could not record this just now. Nothing was changed; the same link will work.</p>
{% endblock %}""",
    "bad-request.html": """{% extends "layout.html" %}{% block title %}Bad request{% endblock %}{% block body %}
<h1>This request was not understood</h1>
<p>{{ detail }} Nothing was changed.</p>
{% endblock %}""",
}

_env = Environment(loader=DictLoader(TEMPLATES), autoescape=select_autoescape(default=True, default_for_string=True))

HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
}


@functools.lru_cache(maxsize=64)
def page(which: str, name: str, status: int = 200, detail: str = "") -> HTMLResponse:
    """The pages hold nothing of the reader's, so each is made once and its response sent
    as often as asked (a Response is only read when sent; nothing here sets cookies on one)."""
    html = _env.get_template(f"{which}.html").render(name=name, detail=detail)
    return HTMLResponse(html, status_code=status, headers=HEADERS)
