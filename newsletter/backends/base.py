"""What every backend provides.

A backend opens ``connections`` workers; each worker is handed ``batch_size`` messages
at a time (one for SMTP; a provider's batch for the HTTP APIs) and answers with an
Outcome for each. A worker handles its own reconnects and retries; it raises SendError
only when sending cannot work at all (refused connection, TLS or login failure, a
refused API key), which stops the whole run with every unsent row still pending.
"""

from __future__ import annotations

from typing import Awaitable

from ..message import Message
from ..outcome import DEFERRED, FAILED, SENT, UNCERTAIN, Outcome

# The states and Outcome live with the policy that reads them (outcome.py).
__all__ = ["SENT", "DEFERRED", "FAILED", "UNCERTAIN", "Outcome", "Worker", "Backend"]


class Worker:
    async def send(self, message: Message) -> Outcome:
        raise NotImplementedError

    def pause(self) -> float:
        """Seconds to wait before taking more work (it could not connect): the others go on."""
        return 0.0

    async def send_batch(self, messages: list[Message], ready: Awaitable | None = None,
                         after: Message | None = None) -> list[Outcome]:
        """`ready`, when given, is done once the ledger says these messages are `sending`:
        nothing may be delivered before (it raises StoreError if that commit failed).
        `after`: the first message of the worker's next batch, if it has one already
        (SMTP starts its envelope early)."""
        if ready is not None:
            await ready
        return [await self.send(message) for message in messages]

    async def close(self) -> None:
        pass


class Backend:
    name = "backend"
    connections = 1
    batch_size = 1

    async def open_worker(self) -> Worker:
        raise NotImplementedError

    async def open_single_worker(self) -> Worker:
        """A worker for one transactional message (a sign-up confirmation): the outbox and
        SMTP send it as they send anything; the HTTP APIs use their single-message endpoint."""
        return await self.open_worker()

    async def close(self) -> None:
        """After the workers: what the backend shares between them (an HTTP client)."""

    def describe(self) -> str:
        return self.name

    def warnings(self) -> list[str]:
        """What the user must hear on every run about how this backend is set up."""
        return []
