"""Running the service: uvicorn serving create_app, with the settings of [serve]."""

from __future__ import annotations

from ..config import Config
from ..store import open_store


def run(config: Config, host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    from .app import create_app
    from .plumbing import setup_access_log
    from .unsubscribe import require_secret

    require_secret(config)
    with open_store(config.store) as store:  # a read-only store is said now, naming the file, not per request
        store.check_writable()
    setup_access_log()

    settings = config.serve
    forwarded = settings.forwarded_allow_ips
    uvicorn.run(create_app(config), host=host or settings.host, port=port or settings.port,
                http=protocol(settings.read_timeout),
                proxy_headers=bool(forwarded), forwarded_allow_ips=forwarded or None,
                server_header=False, log_level="info",
                access_log=False)  # uvicorn's prints whole paths, tokens and all: plumbing.AccessLog instead


def protocol(read_timeout: float):
    """uvicorn's h11 protocol, with a deadline for a request's headers: uvicorn itself waits
    for them forever (its keep-alive timer stops at the first byte), so a client sending them
    a byte at a time, or never, would hold its connection for good (slow loris). Pinned to
    h11, not httptools, so that this holds whatever else is installed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()  # the next request's headers, on a kept-alive connection

        def connection_lost(self, exc):
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
            if read_timeout:
                self._header_timer = self.loop.call_later(read_timeout, self._too_slow)

        def _too_slow(self):
            self._header_timer = None
            # no request under way: its headers have not all come in time
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return Protocol
