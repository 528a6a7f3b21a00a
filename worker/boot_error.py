"""The one error boot raises: the worker cannot serve on this machine."""

from __future__ import annotations


class BootError(RuntimeError):
    """The worker cannot serve on this machine; the message says why and what would.

    ``transient``: the cause may pass by itself (a weights host answering 5xx or timing out): the
    process exits 1 so the entrypoint restarts it with backoff, instead of 3, which ends the container.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
