"""What every backend provides, and the one place replies become ledger outcomes.

A backend opens ``connections`` workers; each worker is handed ``batch_size`` messages
at a time (one for SMTP; a provider's batch for the HTTP APIs) and answers with an
Outcome for each. A worker handles its own reconnects and retries; it raises SendError
only when sending cannot work at all (refused connection, TLS or login failure, a
refused API key), which stops the whole run with every unsent row still pending.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..message import Message

SENT, DEFERRED, FAILED = "sent", "deferred", "failed"


@dataclass(frozen=True)
class Outcome:
    state: str  # sent, deferred or failed
    reply: str  # the server's words, for the ledger and `status`
    suppress: bool = False  # the address does not exist: never send to it again
    retry_after: float | None = None  # deferred: not before this many seconds (a provider's word)


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


def smtp_outcome(code: int, text: str) -> Outcome:
    """2xx sent; 4xx deferred (try later); 5xx failed, never retried; 5.1.x suppressed."""
    reply = f"{code} {text}".strip()
    if 200 <= code < 300:
        return Outcome(SENT, reply)
    if 400 <= code < 500:
        return Outcome(DEFERRED, reply)
    enhanced = _ENHANCED.match(text)
    return Outcome(FAILED, reply, suppress=bool(enhanced and enhanced.group(1) == "5" and enhanced.group(2) == "1"))


class Worker:
    async def send(self, message: Message) -> Outcome:
        raise NotImplementedError

    async def send_batch(self, messages: list[Message]) -> list[Outcome]:
        return [await self.send(message) for message in messages]

    async def close(self) -> None:
        pass


class Backend:
    name = "backend"
    connections = 1
    batch_size = 1

    async def open_worker(self) -> Worker:
        raise NotImplementedError

    async def close(self) -> None:
        """After the workers: what the backend shares between them (an HTTP client)."""

    def describe(self) -> str:
        return self.name
