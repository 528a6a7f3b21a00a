"""Job errors: the error code and whether a retry can help travel with the exception.

Like dramatiq's ``Retry``, the retry decision is carried by the error type; the worker's
runner reads ``retryable`` in one place and acks or releases the message accordingly.
"""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "invalid_input",
    "download_failed",
    "upload_failed",
    "out_of_memory",
    "timeout",
    "internal",
]


class JobError(Exception):
    """A failure that ends (or retries) a job with a public error code."""

    code: ErrorCode = "internal"
    retryable: bool = False

    def __init__(self, message: str, *, code: ErrorCode | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidInput(JobError):
    """The job itself is wrong: never retried."""

    code: ErrorCode = "invalid_input"
    retryable = False


class DownloadFailed(JobError):
    """An input image could not be fetched. 4xx and bad content are permanent; 5xx/network transient."""

    code: ErrorCode = "download_failed"


class UploadFailed(JobError):
    """An output could not be stored. An expired/forbidden URL is permanent; 5xx/network transient."""

    code: ErrorCode = "upload_failed"


class OutOfMemory(JobError):
    """The GPU could not hold the requested size/references: permanent for this request."""

    code: ErrorCode = "out_of_memory"
    retryable = False
