"""The providers' event webhooks: bounces, complaints and unsubscribes coming back.

    POST /webhooks/sendgrid   /webhooks/mailgun   /webhooks/postmark   /webhooks/resend   /webhooks/ses

Each request is checked exactly as its provider documents (hooks/<provider>.py says how,
and cites where), then each event goes through Store.record_events, the same policy as
every other door (outcome.event_effect): a hard bounce or a complaint suppresses the address
and fails its ledger row, a soft bounce changes nothing, an unsubscribe unsubscribes; an
event seen before (by its provider's id) changes nothing twice.

Answers: 200 {"events": n, "changed": m} (events we do not act on, such as delivered or
open, are taken with 200 at once); 401 bad or missing signature or credentials; 403 an
address or topic not allowed; 400 a body that is not what the provider sends; 413 too
large; 404 a provider whose secret is not set. Nothing is changed unless the answer is 200.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from ..errors import StoreError
from ..outcome import Event
from .hooks import Incoming, Rejected, mailgun, postmark, resend, sendgrid, ses
from .plumbing import store_thread

log = logging.getLogger("newsletter.webhooks")


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Rejected(413, f"the body is over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _record(store, events: list[Event]) -> int:
    """In the store's thread (plumbing.StoreThread), on its one connection."""
    return store.record_events(events)


def _endpoint(provider):
    async def endpoint(request: Request) -> JSONResponse:
        config = request.app.state.config
        settings = config.webhooks
        if not provider.configured(settings):
            return JSONResponse({"error": f"the {provider.NAME} webhook is not set up here"}, status_code=404)
        states = request.app.state.__dict__.setdefault("webhook_state", {})
        incoming = None
        try:
            incoming = Incoming(request.headers, await _body(request, settings.max_body),
                                request.client.host if request.client else None, settings,
                                states.setdefault(provider.NAME, {}))
            events = await provider.events(incoming)
            changed = await store_thread(config.store).call(_record, events) if events else 0
        except Rejected as exc:
            # the provider's words about the request, never a secret or the body
            log.warning("%s webhook refused (%d): %s", provider.NAME, exc.status, exc.message)
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        except ClientDisconnect:
            return JSONResponse({"error": "the request was cut short"}, status_code=400)
        except HTTPException as exc:  # the service's own body limit, noticed while reading (plumbing)
            return JSONResponse({"error": str(exc.detail).strip()}, status_code=exc.status_code)
        except StoreError as exc:  # read-only, full, or busy past its timeout: said, the provider retries
            if incoming is not None and incoming.token:
                mailgun.forget(incoming, incoming.token)
            log.error("%s webhook: could not record its events: %s", provider.NAME, exc)
            return JSONResponse({"error": "could not record the events; try again"}, status_code=503)
        except Exception:
            if incoming is not None and incoming.token:
                mailgun.forget(incoming, incoming.token)  # its retry must not look like a replay
            log.exception("%s webhook: could not record its events", provider.NAME)
            return JSONResponse({"error": "could not record the events; try again"}, status_code=500)
        if events:
            log.info("%s webhook: %d events, %d changed", provider.NAME, len(events), changed)
        return JSONResponse({"events": len(events), "changed": changed})

    endpoint.__name__ = f"{provider.NAME}_webhook"
    return endpoint


sendgrid_webhook = _endpoint(sendgrid)
mailgun_webhook = _endpoint(mailgun)
postmark_webhook = _endpoint(postmark)
resend_webhook = _endpoint(resend)
ses_webhook = _endpoint(ses)
