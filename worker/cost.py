"""What a job cost: its GPU time and its share of the instance's price.

``gpu_seconds`` is the time the job's thread held the GPU lock (``handlers.gpu_lock``).

``cost_usd`` splits the worker's ``PRICE_PER_HOUR`` evenly over the jobs in hand: each moment of
a job's wall time (from the executor taking it to its result being built) is charged
``price / n``, where n is the number of jobs in hand at that moment. With JOB_CONCURRENCY=2 a job
that ran alone for 1 s and alongside another for 2 s is charged for 1 + 2/2 = 2 s. The charges of
all jobs add up to the price of the time the worker had work; idle time is charged to nobody.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

SECONDS_PER_HOUR = 3600.0


class ShareClock:
    """Integrates 1/n over time while n > 0 jobs are in hand: a job's share is the clock's advance
    between its start and its stop. O(1) per change; no per-job bookkeeping beyond the start mark."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._in_hand = 0
        self._shared = 0.0  # the integral so far
        self._last = clock()

    def _advance(self) -> float:
        now = self._clock()
        if self._in_hand:
            self._shared += (now - self._last) / self._in_hand
        self._last = now
        return self._shared

    def start(self) -> float:
        """A job enters; returns its start mark."""
        with self._lock:
            mark = self._advance()
            self._in_hand += 1
            return mark

    def stop(self, mark: float) -> float:
        """The job that started at ``mark`` leaves; returns its share of the wall time, in seconds."""
        with self._lock:
            share = self._advance() - mark
            self._in_hand = max(0, self._in_hand - 1)
            return share


def cost_usd(share_seconds: float, price_per_hour: float | None) -> float | None:
    """The job's cost for ``share_seconds`` of the worker at ``price_per_hour``; None when unknown."""
    if price_per_hour is None:
        return None
    return round(price_per_hour * share_seconds / SECONDS_PER_HOUR, 8)
