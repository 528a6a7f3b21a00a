"""What an HTTP reply means to a transfer: success, a permanent failure (most 4xx, a body that is
not an image), or a ``TransientFailure`` that a later attempt may not meet (5xx, throttling, S3's
own timeout and slow-down codes). ``worker.transfer`` retries the transient ones.

Error texts name the URL redacted; only the first few KB of an error body are ever read.
"""

from __future__ import annotations

import re

import requests

from handlers.errors import InvalidInput, JobError
from worker.urls import redact_url

# Enough of an error body to read S3's <Code>; never more, since any endpoint may answer with gigabytes.
_ERROR_BODY_BYTES = 4096
_S3_ERROR_CODE = re.compile(rb"<Code>([A-Za-z]{1,64})</Code>")
# 4xx statuses a later attempt can fix (server-side timeout, throttling); every other 4xx is final.
_TRANSIENT_STATUSES = frozenset({408, 429})
# S3 sends 400 RequestTimeout when the body arrived too slowly: the network, not the job.
_TRANSIENT_S3_CODES = frozenset({"RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable"})
# Obviously not an image; anything else (octet-stream, missing, wrong image/*) is left to the decoder.
_NON_IMAGE_TYPES = ("text/", "application/json", "application/xml", "application/xhtml", "audio/", "video/")


class TransientFailure(Exception):
    """One attempt failed in a way a later attempt may not; ``reason`` is safe to log."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


def check_status(
    response: requests.Response, *, action: str, url: str, field: str, error: type[JobError]
) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    code = _s3_error_code(response)
    detail = f"HTTP {status}" + (f" ({code})" if code else "")
    if status >= 500 or status in _TRANSIENT_STATUSES or code in _TRANSIENT_S3_CODES:
        raise TransientFailure(detail)
    raise error(f"{field}: {action} of {redact_url(url)} failed: {detail}", retryable=False)


def _s3_error_code(response: requests.Response) -> str | None:
    """S3's ``<Code>`` from the start of an error body (its full text may echo the request)."""
    try:
        head = next(response.iter_content(chunk_size=_ERROR_BODY_BYTES), b"")
    except (requests.RequestException, OSError):
        return None
    match = _S3_ERROR_CODE.search(head) if isinstance(head, bytes) else None
    return match.group(1).decode("ascii") if match else None


def check_content_type(response: requests.Response, *, url: str, field: str) -> None:
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type.startswith(_NON_IMAGE_TYPES):
        raise InvalidInput(f"{field}: {redact_url(url)} returned Content-Type {content_type!r}, not an image")
