"""Upscaler checkpoints by path or URL: a URL is downloaded once into a cache folder and reused.

The file lands under a name derived from the URL (so two URLs ending in the same file name do not
collide) through a temporary file in the same folder and an atomic rename: a crash mid-download,
or two workers sharing the cache, never leave a truncated checkpoint under the final name. The
official release files are checksum-pinned (``PINNED_SHA256``): a changed, truncated or corrupted
file never loads. Any other file's sha256 is logged, so what a worker ran can be checked.

A download failure is classified like an input download (SPEC: 4xx permanent, 5xx and connection
errors retried, a timeout is ``timeout``), and its message names the setting to fix.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import requests

from handlers.errors import JobError

logger = logging.getLogger(__name__)

# Generous: the Real-ESRGAN files are 64-67 MB from GitHub's CDN.
DOWNLOAD_TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20
URL_SCHEMES = ("http://", "https://")

# The official Real-ESRGAN release files (BSD-3-Clause), the defaults of UPSCALER_WEIGHTS_X2/_X4.
REALESRGAN_X2PLUS_URL = (
    "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.1/RealESRGAN_x2plus.pth"
)
REALESRGAN_X4PLUS_URL = (
    "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth"
)
# sha256 of the release files (67,061,725 and 67,040,989 bytes), as published alongside them by
# many independent pinning manifests (ComfyUI model lists, Arch PKGBUILDs, OpenModelDB).
PINNED_SHA256: dict[str, str] = {
    REALESRGAN_X2PLUS_URL: "49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb",
    REALESRGAN_X4PLUS_URL: "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
}


class WeightsUnavailable(JobError):
    """Upscaler weights that cannot be fetched or do not match their pinned checksum."""

    code = "download_failed"


def is_url(source: str) -> bool:
    return source.startswith(URL_SCHEMES)


def cache_path(url: str, cache_dir: str | Path) -> Path:
    """Where ``url`` is cached: ``<sha256(url)[:16]>-<file name>`` in ``cache_dir``."""
    name = Path(unquote(urlsplit(url).path)).name or "weights"
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{digest}-{name}"


def resolve_weights(
    source: str,
    *,
    cache_dir: str | Path,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    setting: str = "upscaler weights",
) -> Path:
    """A local file for ``source``: the path itself, or the cached download of a URL.

    ``setting`` (e.g. ``UPSCALER_WEIGHTS_X4``) is named in every error, so it says what to fix.
    """
    if not is_url(source):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{setting}: weights file not found: {source}")
        return path
    path = cache_path(source, cache_dir)
    if path.is_file():
        digest = file_sha256(path)
        if _matches_pin(source, digest):
            logger.info("upscaler weights %s: cached at %s (sha256 %s)", _public(source), path, digest)
            return path
        logger.warning("upscaler weights cached at %s fail their checksum; downloading again", path)
        path.unlink()
    return download(source, path, timeout=timeout, setting=setting)


def _matches_pin(url: str, digest: str) -> bool:
    pinned = PINNED_SHA256.get(url)
    return pinned is None or pinned == digest


def _public(url: str) -> str:
    """``url`` without its query string, which may hold a presigned signature."""
    return urlsplit(url)._replace(query="", fragment="").geturl()


def _download_error(url: str, setting: str, exc: requests.RequestException) -> WeightsUnavailable:
    """SPEC's classes: a 4xx is permanent (the setting is wrong), a timeout is ``timeout``,
    5xx and connection errors may pass on a later attempt."""
    where = f"{setting}: {_public(url)}"
    status = exc.response.status_code if exc.response is not None else None
    if status is not None and 400 <= status < 500:
        return WeightsUnavailable(f"{where} answered HTTP {status}; fix the setting", retryable=False)
    if isinstance(exc, requests.Timeout):
        return WeightsUnavailable(f"{where} timed out", code="timeout", retryable=True)
    reason = f"HTTP {status}" if status is not None else type(exc).__name__
    return WeightsUnavailable(f"{where} could not be downloaded ({reason})", retryable=True)


def download(
    url: str, dest: Path, *, timeout: float = DOWNLOAD_TIMEOUT_S, setting: str = "upscaler weights"
) -> Path:
    """Stream ``url`` to ``dest`` atomically, checking its pinned sha256 before the rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, partial = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with requests.get(url, stream=True, timeout=timeout) as response:
                    response.raise_for_status()
                    for chunk in response.iter_content(CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
            except requests.RequestException as exc:
                raise _download_error(url, setting, exc) from exc
            out.flush()
            os.fsync(out.fileno())
        if not _matches_pin(url, digest.hexdigest()):
            raise WeightsUnavailable(
                f"{setting}: {_public(url)} is not the pinned release file ({size} bytes, sha256 "
                f"{digest.hexdigest()}, expected {PINNED_SHA256[url]})",
                retryable=True,  # most often a download cut short; a later attempt fetches it again
            )
        os.replace(partial, dest)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.info(
        "upscaler weights %s: downloaded %d bytes to %s (sha256 %s)",
        _public(url),
        size,
        dest,
        digest.hexdigest(),
    )
    return dest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()
