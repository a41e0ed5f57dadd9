"""Backends deliver built messages, one worker per connection; see base.py for the contract."""

from __future__ import annotations

from ..config import API_BACKENDS, BACKENDS, Config
from ..errors import ConfigError
from .base import Backend

NAMES = BACKENDS


def get_backend(name: str, config: Config, issue_stem: str) -> Backend:
    if name == "outbox":
        from .outbox import OutboxBackend

        return OutboxBackend(config.send.outbox / issue_stem)
    if name == "smtp":
        from .smtp import SmtpBackend

        return SmtpBackend(config.smtp)
    if name in API_BACKENDS:
        import importlib

        module = importlib.import_module(f".{name}", __name__)
        return module.Backend(config.apis[name])
    raise ConfigError([f"--backend: expected one of {', '.join(NAMES)}, got {name!r}"])
