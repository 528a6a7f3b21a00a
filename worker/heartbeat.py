"""Visibility heartbeat: keeps every message in hand invisible while its job runs."""

from __future__ import annotations

import logging
import threading

from worker.queue import JobSource, Message

log = logging.getLogger(__name__)


class Heartbeat:
    """Extends each tracked message by ``visibility_timeout`` every third of it.

    A third leaves two missed beats of slack before a second worker could see the job.
    """

    def __init__(self, *, source: JobSource, visibility_timeout: int) -> None:
        self._source = source
        self._visibility = visibility_timeout
        self._interval = max(1.0, visibility_timeout / 3)
        self._held: dict[str, Message] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def track(self, message: Message) -> None:
        with self._lock:
            self._held[message.message_id] = message

    def untrack(self, message: Message) -> None:
        with self._lock:
            self._held.pop(message.message_id, None)

    def held(self) -> list[Message]:
        with self._lock:
            return list(self._held.values())

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            for message in self.held():
                try:
                    self._source.extend(message, self._visibility)
                except Exception:  # a missed beat must not kill the heartbeat thread
                    log.warning("heartbeat failed for message %s", message.message_id, exc_info=True)
