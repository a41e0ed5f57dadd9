"""One-click unsubscribe (RFC 8058) at the path of `[publication] unsubscribe_url`.

    POST  body List-Unsubscribe=One-Click (urlencoded or multipart, as mailbox providers
          send it): unsubscribed at once; 200 and a short page; no redirect, login, cookie
          or CSRF token (the token in the URL is the authority).
    GET   a page with a button that makes that POST; a GET never unsubscribes, because
          link scanners and previews follow every link in a message.

A forged, truncated or altered token, or one of another list, gets 400 and changes
nothing; a token the store does not know gets 404. A second unsubscribe answers as a
success. The page never shows the address: anyone the message was forwarded to holds
the same link.
"""

from __future__ import annotations

import functools
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse

from ..config import Config
from ..errors import ConfigError, StoreError
from ..outcome import UNSUBSCRIBE, Event
from ..recipients import Recipient
from ..store import DB_ERRORS, Store
from ..tokens import Signer, TokenError
from .pages import page
from .plumbing import store_thread

DEFAULT_PATH = "/unsubscribe/{token}"
FIELD, VALUE = "List-Unsubscribe", "One-Click"
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def route_path(config: Config | None) -> str:
    """The route the links in sent mail reach: the path of unsubscribe_url, {token} kept."""
    url = config.publication.unsubscribe_url if config else None
    if not url:
        return DEFAULT_PATH
    path = urlsplit(url.replace("{token}", "TOKEN")).path.replace("TOKEN", "{token}")
    if "{token}" not in path:  # the token in the query (…/u?t={token}): the route is the path
        return path or "/"
    return path


def require_secret(config: Config) -> None:
    """serve checks tokens that send signed: without the same secret every link fails."""
    if not config.send.secret:
        raise ConfigError(["NEWSLETTER_SECRET is not set; `newsletter serve` checks the unsubscribe links "
                           "with it, so it must be the one `send` signed them with"])


@functools.lru_cache(maxsize=4)
def _signer(secret: str, list_id: str) -> Signer:
    return Signer(secret.encode("utf-8"), list_id)


def _token(request: Request) -> str:
    if "token" in request.path_params:
        return request.path_params["token"]
    # The token in the query: the name is whatever unsubscribe_url puts before {token}.
    query = urlsplit(request.app.state.config.publication.unsubscribe_url or "").query
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if value == "{token}":
            return request.query_params.get(name, "")
    return ""


def _unsubscribe(store: Store, rkey: str) -> bool:
    """In the store's thread. False when the store knows no such recipient key."""
    email = store.email_for_key(rkey)
    if email is None:
        return False
    if not store.record_event(Event(UNSUBSCRIBE, email, "one-click")):
        # Already unsubscribed, or sent from a list file and so no subscriber here yet:
        # keep the unsubscribe as a subscriber row, which is what every send checks.
        if store.status(email) is None:
            store.add(Recipient(email, status="unsubscribed"), "one-click")
    return True


def _known(store: Store, rkey: str) -> bool:
    return store.email_for_key(rkey) is not None


async def one_click(request: Request) -> HTMLResponse:
    config: Config = request.app.state.config
    name = config.publication.name
    try:
        rkey = _signer(config.send.secret or "", config.publication.list_id).verify(_token(request))
    except TokenError:
        return page("invalid", name, status=400)
    if request.method == "GET" or request.method == "HEAD":
        try:
            known = await store_thread(config.store).call(_known, rkey)
        except (StoreError, *DB_ERRORS):
            return page("unavailable", name, status=503)
        return page("confirm", name) if known else page("unknown", name, status=404)

    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in FORM_TYPES:
        return page("bad-request", name, status=415,
                    detail="Send the form as application/x-www-form-urlencoded or multipart/form-data.")
    if kind == FORM_TYPES[0]:  # the usual case, parsed without Starlette's form machinery
        try:
            said = dict(parse_qsl((await request.body()).decode("latin-1"), max_num_fields=20)).get(FIELD)
        except ValueError:  # more fields than any one-click POST has
            said = None
    else:
        async with request.form(max_files=0, max_fields=20) as form:
            said = form.get(FIELD)
    if said != VALUE:
        return page("bad-request", name, status=400, detail=f"The body must be {FIELD}={VALUE}.")
    try:
        found = await store_thread(config.store).call(_unsubscribe, rkey)
    except (StoreError, *DB_ERRORS):  # the store unreachable, or locked past its 30 s
        return page("unavailable", name, status=503)
    if not found:
        return page("unknown", name, status=404)
    return page("done", name)
