"""Backends deliver built messages, one worker per connection; see base.py for the contract."""

from __future__ import annotations

from ..config import Config
from ..errors import ConfigError
from .base import Backend

NAMES = ("outbox", "smtp")


def get_backend(name: str, config: Config, issue_stem: str) -> Backend:
    if name == "outbox":
        from .outbox import OutboxBackend

        return OutboxBackend(config.send.outbox / issue_stem)
    if name == "smtp":
        from .smtp import SmtpBackend

        return SmtpBackend(config.smtp)
    raise ConfigError([f"--backend: expected one of {', '.join(NAMES)}, got {name!r}"])
