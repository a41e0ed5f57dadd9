"""The service's route table, read at a glance (the Starlette shape): every public URL is here."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..config import Config
from ..store import Store
from . import signup, webhooks


async def health(request: Request) -> JSONResponse:
    """Up, and the store answers."""
    try:
        with Store(request.app.state.config.store.path) as store:
            store.db.execute("SELECT 1").fetchone()
    except Exception as exc:  # any failure to reach the store is "unhealthy", said plainly
        return JSONResponse({"status": "unhealthy", "store": type(exc).__name__}, status_code=503)
    return JSONResponse({"status": "ok"})


def routes() -> list[Route]:
    return [
        Route("/health", health, methods=["GET"]),
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
    app = Starlette(routes=routes())
    app.state.config = config
    app.state.signup = signup.Signup(config)  # checks [signup] now: a sign-up that cannot work stops start-up
    return app
