"""The GPU lock, which also counts how long each thread held it (a job's ``gpu_seconds``).

A job runs on one thread of the runner's pool and takes ``Engines.gpu`` around every model call,
so the time the current thread held this lock is the time its job held the model. Handlers keep
writing ``with engines.gpu:``; only the executor reads the count.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType


class TimedLock:
    """A non-reentrant lock (like ``threading.Lock``) that sums, per thread, the seconds it was held."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        acquired = self._lock.acquire(blocking, timeout)
        if acquired:
            self._local.since = time.perf_counter()  # waiting for the lock is not holding it
        return acquired

    def release(self) -> None:
        since = getattr(self._local, "since", None)
        if since is not None:
            self._local.total = self.held_seconds() + time.perf_counter() - since
            self._local.since = None
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def held_seconds(self) -> float:
        """Seconds the calling thread has held the lock so far (completed holds only)."""
        total: float = getattr(self._local, "total", 0.0)
        return total

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
