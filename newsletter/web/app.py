"""The service's route table, read at a glance (the Starlette shape): every public URL is here."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..config import Config
from ..store import Store
from . import unsubscribe
from .plumbing import Plumbing


async def health(request: Request) -> JSONResponse:
    """Up, and the store answers."""
    try:
        with Store(request.app.state.config.store.path) as store:
            store.db.execute("SELECT 1").fetchone()
    except Exception as exc:  # any failure to reach the store is "unhealthy", said plainly
        return JSONResponse({"status": "unhealthy", "store": type(exc).__name__}, status_code=503)
    return JSONResponse({"status": "ok"})


def routes(config: Config | None = None) -> list[Route]:
    return [
        Route("/health", health, methods=["GET"]),
        Route(unsubscribe.route_path(config), unsubscribe.one_click, methods=["GET", "POST"]),
    ]


def create_app(config: Config) -> Starlette:
    app = Starlette(routes=routes(config), middleware=[Middleware(Plumbing, max_body=config.serve.max_body)])
    app.state.config = config
    return app
