"""Several job queues behind one ``JobSource``: the higher queue's job is always taken first.

``QUEUE_URLS`` lists the queues highest first. Each ``receive`` sweeps them from the top:

- the highest queue gets a long poll, capped at ``TOP_POLL_CAP_SECONDS``: it returns at once when
  a job is there (a long poll also asks every SQS server, so a waiting job is never missed the way a
  short poll can miss one) and otherwise waits, so an idle worker spends its time listening to the
  highest queue;
- every lower queue, only when every queue above it came back empty, gets a zero-wait receive:
  no long poll on a lower queue ever holds the worker while the highest queue has work.

Worst-case added latency for a job arriving on the highest queue, on a worker with a free slot:
the zero-wait receives of the lower queues in the sweep it arrived during (one round trip each),
then the next sweep's first receive finds it. A lower queue's job on an idle worker waits at most
``TOP_POLL_CAP_SECONDS`` plus those round trips. Running jobs are never pre-empted: a worker whose
slots are all busy takes the highest queue's job when a slot frees.

``lower_share`` (``LOWER_QUEUE_SHARE``) keeps lower queues from starving under a steady stream of
high-priority work: every job taken earns ``lower_share`` of a turn, and a whole turn makes the
next sweep start with a lower queue (rotating among them); so while they have work, about that
fraction of the jobs taken comes from them. 0 (the default) is strict priority.

Heartbeats, releases and deletes go to the queue the message came from (``Message.queue``).
A queue that cannot be read fails the whole receive: the runner logs it, backs off and retries,
and /healthz turns 503, rather than the worker quietly serving the other queues out of order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from worker.queue import JobSource, Message

log = logging.getLogger(__name__)

# An idle worker re-checks the lower queues this often. Longer saves receive calls (SQS bills per
# request, ~$0.40 per million) but delays a lower queue's job on an idle fleet by as much.
TOP_POLL_CAP_SECONDS = 5


class QueueSource(JobSource, Protocol):
    @property
    def queue_url(self) -> str: ...


class PriorityJobSource:
    """A ``JobSource`` over ``sources`` (highest priority first), each a single-queue source."""

    def __init__(self, *, sources: Sequence[QueueSource], lower_share: float = 0.0) -> None:
        if not sources:
            raise ValueError("PriorityJobSource needs at least one queue")
        if not 0.0 <= lower_share < 1.0:
            raise ValueError(f"lower_share must be in [0, 1), got {lower_share}")
        self._sources = list(sources)
        self._by_url = {s.queue_url: s for s in self._sources}
        self._share = lower_share
        self._credit = 0.0  # turns owed to the lower queues
        self._next_lower = 1  # which lower queue the next share turn starts with
        self._lock = threading.Lock()  # the runner receives from one thread; guard the counters anyway

    @property
    def queue_urls(self) -> list[str]:
        return [s.queue_url for s in self._sources]

    def receive(self, *, max_messages: int, wait_seconds: int) -> list[Message]:
        for index in self._sweep_order():
            wait = min(wait_seconds, TOP_POLL_CAP_SECONDS) if index == 0 else 0
            messages = self._sources[index].receive(max_messages=max_messages, wait_seconds=wait)
            if messages:
                self._taken(index, len(messages))
                return messages
        return []

    def extend(self, message: Message, seconds: int) -> None:
        self._source_of(message).extend(message, seconds)

    def release(self, message: Message, delay_seconds: int = 0) -> None:
        self._source_of(message).release(message, delay_seconds)

    def delete(self, message: Message) -> None:
        self._source_of(message).delete(message)

    # -- internals ---------------------------------------------------------------------------

    def _sweep_order(self) -> list[int]:
        order = list(range(len(self._sources)))
        with self._lock:
            if self._share > 0 and len(order) > 1 and self._credit >= 1.0:
                first = self._next_lower
                self._next_lower = first + 1 if first + 1 < len(order) else 1
                order.remove(first)
                order.insert(0, first)
        return order

    def _taken(self, index: int, count: int) -> None:
        if self._share <= 0:
            return
        with self._lock:
            # Capped: while the lower queues are empty, owed turns must not pile up into a burst later.
            self._credit = min(self._credit + self._share * count, 1.0 + self._share)
            if index > 0:
                self._credit = max(0.0, self._credit - count)

    def _source_of(self, message: Message) -> QueueSource:
        try:
            return self._by_url[message.queue]
        except KeyError:
            raise ValueError(f"message {message.message_id} came from an unknown queue") from None
