"""How the runner's receives are going, for /healthz: when one last succeeded, how many failed since.

Created before the runner (the metrics endpoint answers while the model loads) and passed to it,
so the health check reads this object rather than reaching into the runner.
"""

from __future__ import annotations

import time


class PollHealth:
    """Written by the runner's poll loop, read by the health endpoint's thread (plain assignments)."""

    def __init__(self) -> None:
        self._last_ok: float | None = None
        self._failures = 0

    def succeeded(self) -> None:
        self._failures = 0
        self._last_ok = time.monotonic()

    def failed(self) -> int:
        """Count one failed receive; returns how many failed in a row."""
        self._failures += 1
        return self._failures

    def last_ok(self) -> float | None:
        """Monotonic time of the last successful receive; None before the first."""
        return self._last_ok

    def failures(self) -> int:
        """Receives failed in a row: botocore has already retried each of them, so one is an outage."""
        return self._failures
