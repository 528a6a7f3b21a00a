"""Guarded downloads, presigned uploads and webhook POSTs, with in-process retries.

The real ``handlers.ports.Transfer``. Every URL and every redirect hop goes through the
SSRF guard (``worker.urls.UrlGuard``); the failure type carries the retry decision:
4xx and bad content are permanent, 5xx/timeouts/connection errors are retried here
``attempts`` times and then surface as ``retryable=True`` for the runner to release the job.
Only redacted URLs appear in logs and messages, and requests' own exceptions (whose text
holds the full URL) are never chained onto ours.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar
from urllib.parse import urljoin

import requests
from PIL import Image

from handlers.errors import DownloadFailed, InvalidInput, JobError, UploadFailed
from handlers.imaging import decode_image
from klein_facts.jobs import MAX_DOWNLOAD_BYTES as DEFAULT_MAX_DOWNLOAD_BYTES
from klein_facts.jobs import MAX_DOWNLOAD_PIXELS as DEFAULT_MAX_PIXELS
from worker.hub_files import HubFiles
from worker.transfer_replies import TransientFailure, check_content_type, check_status
from worker.urls import HostResolutionError, PinnedAddressAdapter, UrlGuard, redact_url

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Enough for CDN -> bucket hops; more is a loop or an attempt to walk the guard.
MAX_REDIRECTS = 5
USER_AGENT = "klein-worker"
_CHUNK_BYTES = 64 * 1024
_NETWORK_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    HostResolutionError,
)


class TransferClient:
    """HTTP transfers for handlers (download, upload) and results (webhook)."""

    def __init__(
        self,
        *,
        allow_private_urls: bool = False,
        allowed_networks: Iterable[str] = (),
        max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        download_deadline_seconds: float = 120.0,
        attempts: int = 3,
        backoff_seconds: float = 0.5,
        session: requests.Session | None = None,
        hub: HubFiles | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self._guard = UrlGuard.build(allow_private=allow_private_urls, allowed_networks=allowed_networks)
        self.max_download_bytes = max_download_bytes
        self.max_pixels = max_pixels
        self._timeout = (connect_timeout, read_timeout)
        self.download_deadline_seconds = download_deadline_seconds
        self._attempts = attempts
        self._backoff = backoff_seconds
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()
        self._hub = hub if hub is not None else HubFiles(offline=True)
        # Connect to the address the guard checked (no DNS rebinding between check and connect).
        for prefix in ("http://", "https://"):
            self._session.mount(prefix, PinnedAddressAdapter(self._guard))

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def download_image(self, url: str, *, field: str = "images") -> Image.Image:
        """Fetch and decode an image (byte-, pixel- and bomb-capped).

        Raises ``InvalidInput`` (refused URL, bad content) or ``DownloadFailed``.
        """
        data = self._with_retries(
            lambda: self._download_once(url, field, accept="image/*", limit=self.max_download_bytes),
            action="download",
            url=url,
            field=field,
            error=DownloadFailed,
        )
        logger.debug("downloaded %s (%d bytes)", redact_url(url), len(data))
        return decode_image(data, max_pixels=self.max_pixels, field=field)

    def download_file(self, url: str, *, field: str, max_bytes: int, limit_name: str) -> bytes:
        """Fetch a file that is not an image (a LoRA adapter) through the same guard, retries and
        deadline, capped at ``max_bytes`` (``limit_name`` is the setting named in the error).

        Raises ``InvalidInput`` (refused URL, too large) or ``DownloadFailed``.
        """
        data = self._with_retries(
            lambda: self._download_once(url, field, accept="*/*", limit=max_bytes, limit_name=limit_name),
            action="download",
            url=url,
            field=field,
            error=DownloadFailed,
        )
        logger.debug("downloaded %s (%d bytes)", redact_url(url), len(data))
        return data

    def download_hub_file(self, repo: str, filename: str, *, field: str, max_bytes: int) -> bytes:
        """A file from a Hugging Face repo (see ``worker.hub_files``)."""
        return self._hub.download(repo, filename, field=field, max_bytes=max_bytes)

    def upload(self, url: str, data: bytes, content_type: str, *, field: str = "upload_url") -> str:
        """PUT ``data`` to a presigned URL; return it without its query string, or raise ``UploadFailed``."""
        # Content-Type is part of the presigned signature (boto3 signs it when given ContentType).
        headers = {"Content-Type": content_type}
        self._with_retries(
            lambda: self._send("PUT", url, data, headers, action="upload", field=field),
            action="upload",
            url=url,
            field=field,
            error=UploadFailed,
        )
        logger.debug("uploaded %d bytes to %s", len(data), redact_url(url))
        return redact_url(url)

    def post_json(
        self, url: str, body: bytes, headers: Mapping[str, str], *, field: str = "webhook_url"
    ) -> None:
        """POST a JSON body (a webhook); raise ``UploadFailed`` (or ``InvalidInput`` for a refused URL)."""
        merged = {"Content-Type": "application/json", **headers}
        self._with_retries(
            lambda: self._send("POST", url, body, merged, action="webhook POST", field=field),
            action="webhook POST",
            url=url,
            field=field,
            error=UploadFailed,
        )

    # -- one attempt ---------------------------------------------------------------------------

    def _download_once(
        self, url: str, field: str, *, accept: str, limit: int, limit_name: str = "MAX_DOWNLOAD_BYTES"
    ) -> bytes:
        # Redirects are followed here, not by requests, so that every hop meets the guard.
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            self._guard.check(current, field=field)
            headers = self._headers({"Accept": accept, "Accept-Encoding": "identity"})
            with self._session.get(
                current, headers=headers, stream=True, allow_redirects=False, timeout=self._timeout
            ) as response:
                if response.is_redirect:
                    current = urljoin(current, response.headers["Location"])
                    logger.debug("download of %s redirected to %s", redact_url(url), redact_url(current))
                    continue
                check_status(response, action="download", url=url, field=field, error=DownloadFailed)
                if accept.startswith("image/"):
                    check_content_type(response, url=url, field=field)
                return self._read_capped(response, url=url, field=field, limit=limit, limit_name=limit_name)
        raise DownloadFailed(
            f"{field}: download of {redact_url(url)} redirected more than {MAX_REDIRECTS} times",
            retryable=False,
        )

    def _read_capped(
        self, response: requests.Response, *, url: str, field: str, limit: int, limit_name: str
    ) -> bytes:
        too_large = (
            f"{field}: {redact_url(url)} is larger than the {limit} byte download limit ({limit_name})"
        )
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise InvalidInput(too_large)
        # Content-Length may be absent or lie: count what actually arrives. The read timeout bounds
        # each chunk, not the whole: a server trickling bytes is stopped by the total deadline.
        deadline = time.monotonic() + self.download_deadline_seconds
        buffer = bytearray()
        for chunk in response.iter_content(chunk_size=_CHUNK_BYTES):
            buffer += chunk
            if len(buffer) > limit:
                raise InvalidInput(too_large)
            if time.monotonic() > deadline:
                raise TransientFailure(
                    f"slower than the {self.download_deadline_seconds:g} s download deadline", timed_out=True
                )
        return bytes(buffer)

    def _send(
        self, method: str, url: str, body: bytes, headers: Mapping[str, str], *, action: str, field: str
    ) -> None:
        self._guard.check(url, field=field)
        # No redirects: re-sending a body elsewhere is never what a presigned URL or webhook means.
        with self._session.request(
            method,
            url,
            data=body,
            headers=self._headers(headers),
            stream=True,
            allow_redirects=False,
            timeout=self._timeout,
        ) as response:
            check_status(response, action=action, url=url, field=field, error=UploadFailed)

    def _headers(self, extra: Mapping[str, str]) -> dict[str, Any]:
        # Only what this request needs: session defaults (or an Authorization a caller set) must not
        # reach a presigned URL, where S3 refuses a second auth mechanism and unsigned x-amz-* headers.
        # A None value makes requests drop the session's header (typeshed's stubs don't say so: Any).
        headers: dict[str, Any] = {name: None for name in self._session.headers}
        headers["User-Agent"] = USER_AGENT
        headers.update(extra)
        return headers

    # -- retries -------------------------------------------------------------------------------

    def _with_retries(
        self, attempt_once: Callable[[], T], *, action: str, url: str, field: str, error: type[JobError]
    ) -> T:
        shown = redact_url(url)
        reason = "no attempt made"
        timed_out = False
        for attempt in range(1, self._attempts + 1):
            try:
                return attempt_once()
            except _NETWORK_ERRORS as exc:
                reason = type(exc).__name__
                timed_out = isinstance(exc, requests.Timeout)
            except TransientFailure as exc:
                reason = exc.reason
                timed_out = exc.timed_out
            except requests.RequestException as exc:
                # Malformed URL or headers and the like: another attempt would fail the same way.
                # ``from None``: requests' message holds the full URL, signature included.
                raise error(
                    f"{field}: {action} of {shown} failed: {type(exc).__name__}", retryable=False
                ) from None
            logger.warning(
                "%s of %s failed (attempt %d/%d): %s", action, shown, attempt, self._attempts, reason
            )
            if attempt < self._attempts:
                time.sleep(self._backoff * 2 ** (attempt - 1))
        # The contract's `timeout` code when the last attempt ran out of time (the connect or read
        # timeout, or the download deadline); the message still says which transfer it was.
        raise error(
            f"{field}: {action} of {shown} failed after {self._attempts} attempts: {reason}",
            code="timeout" if timed_out else None,
            retryable=True,
        )
