"""The embedded default: each message becomes an .eml file that any mail client opens."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import SendError
from ..message import Message
from .base import SENT, Backend, Outcome, Worker


class OutboxWorker(Worker):
    def __init__(self, folder: Path):
        self.folder = folder

    async def send(self, message: Message) -> Outcome:
        safe = re.sub(r"[^A-Za-z0-9@._+-]", "_", message.recipient)
        path = self.folder / f"{safe}.eml"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(message.data)
            os.replace(tmp, path)
        except OSError as exc:
            raise SendError(f"outbox: cannot write {path}: {exc.strerror or exc}") from exc
        return Outcome(SENT, f"written to {path}")


class OutboxBackend(Backend):
    name = "outbox"
    connections = 1

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    async def open_worker(self) -> Worker:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SendError(f"outbox: cannot create {self.folder}: {exc.strerror or exc}") from exc
        return OutboxWorker(self.folder)

    def describe(self) -> str:
        return f"outbox {self.folder}"
