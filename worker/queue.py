"""The job source interface (dramatiq's broker/consumer split): receive, extend, release, delete.

The runner speaks only this protocol; ``worker.sqs`` is the real implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Message:
    message_id: str
    receipt: str
    body: str
    receive_count: int  # ApproximateReceiveCount: 1 on first delivery
    sent_at: float | None  # SentTimestamp, epoch seconds
    queue: str = ""  # the URL of the queue it came from: extend/release/delete go back there


class JobSource(Protocol):
    def receive(self, *, max_messages: int, wait_seconds: int) -> list[Message]:
        """Long-poll for up to ``max_messages``; each comes back invisible for the visibility timeout."""
        ...

    def extend(self, message: Message, seconds: int) -> None:
        """Heartbeat: keep ``message`` invisible for ``seconds`` from now."""
        ...

    def release(self, message: Message, delay_seconds: int = 0) -> None:
        """Hand ``message`` back: visible again after ``delay_seconds`` (0 = at once)."""
        ...

    def delete(self, message: Message) -> None:
        """Acknowledge: the job is finished and its result published."""
        ...


class ResultSink(Protocol):
    def send(self, body: str) -> None: ...
