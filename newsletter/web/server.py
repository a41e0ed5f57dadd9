"""Running the service: uvicorn serving create_app, with the settings of [serve]."""

from __future__ import annotations

from ..config import Config
from ..store import Store


def run(config: Config, host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    from .app import create_app
    from .plumbing import setup_access_log
    from .unsubscribe import require_secret

    require_secret(config)
    with Store(config.store.path) as store:  # a read-only store is said now, naming the file, not per request
        store.check_writable()
    setup_access_log()

    settings = config.serve
    forwarded = settings.forwarded_allow_ips
    uvicorn.run(create_app(config), host=host or settings.host, port=port or settings.port,
                proxy_headers=bool(forwarded), forwarded_allow_ips=forwarded or None,
                server_header=False, log_level="info",
                access_log=False)  # uvicorn's prints whole paths, tokens and all: plumbing.AccessLog instead
