"""The service's route table, read at a glance (the Starlette shape): every public URL is here."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..config import Config
from ..store import open_store
from . import signup, unsubscribe, webhooks
from .plumbing import Plumbing


async def health(request: Request) -> JSONResponse:
    """Up, and the store answers."""
    try:
        with open_store(request.app.state.config.store) as store:
            store.db.execute("SELECT 1").fetchone()
    except Exception as exc:  # any failure to reach the store is "unhealthy", said plainly
        return JSONResponse({"status": "unhealthy", "store": type(exc).__name__}, status_code=503)
    return JSONResponse({"status": "ok"})


def routes(config: Config | None = None) -> list[Route]:
    return [
        Route("/health", health, methods=["GET"]),
        Route(unsubscribe.route_path(config), unsubscribe.one_click, methods=["GET", "POST"]),
        Route("/subscribe", signup.form_page, methods=["GET"]),
        Route("/subscribe", signup.subscribe, methods=["POST"]),
        Route("/subscribe", signup.preflight, methods=["OPTIONS"]),
        Route("/subscribe/confirm/{token}", signup.confirm_page, methods=["GET"]),
        Route("/subscribe/confirm/{token}", signup.confirm, methods=["POST"]),
        Route("/webhooks/sendgrid", webhooks.sendgrid_webhook, methods=["POST"]),
        Route("/webhooks/mailgun", webhooks.mailgun_webhook, methods=["POST"]),
        Route("/webhooks/postmark", webhooks.postmark_webhook, methods=["POST"]),
        Route("/webhooks/resend", webhooks.resend_webhook, methods=["POST"]),
        Route("/webhooks/ses", webhooks.ses_webhook, methods=["POST"]),
    ]


def create_app(config: Config) -> Starlette:
    # Webhook batches are megabytes: [webhooks] max_body is theirs (their handler checks it too).
    larger = {"/webhooks/": config.webhooks.max_body} if config.webhooks else {}
    app = Starlette(routes=routes(config),
                    middleware=[Middleware(Plumbing, max_body=config.serve.max_body, larger=larger,
                                               read_timeout=config.serve.read_timeout)])
    app.state.config = config
    app.state.signup = signup.Signup(config)  # checks [signup] now: a sign-up that cannot work stops start-up
    return app
