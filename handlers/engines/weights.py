"""Upscaler checkpoints by path or URL: a URL is downloaded once into a cache folder and reused.

The file lands under a name derived from the URL (so two URLs ending in the same file name do not
collide) through a temporary file in the same folder and an atomic rename: a crash mid-download,
or two workers sharing the cache, never leave a truncated checkpoint under the final name. The
sha256 of the file is logged, so what a worker ran can be checked against the release.
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


def is_url(source: str) -> bool:
    return source.startswith(URL_SCHEMES)


def cache_path(url: str, cache_dir: str | Path) -> Path:
    """Where ``url`` is cached: ``<sha256(url)[:16]>-<file name>`` in ``cache_dir``."""
    name = Path(unquote(urlsplit(url).path)).name or "weights"
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{digest}-{name}"


def resolve_weights(source: str, *, cache_dir: str | Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """A local file for ``source``: the path itself, or the cached download of a URL."""
    if not is_url(source):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"upscaler weights file not found: {source}")
        return path
    path = cache_path(source, cache_dir)
    if path.is_file():
        logger.info("upscaler weights %s: cached at %s (sha256 %s)", source, path, file_sha256(path))
        return path
    return download(source, path, timeout=timeout)


def download(url: str, dest: Path, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Stream ``url`` to ``dest`` atomically; a failure is a retryable ``internal`` job error."""
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
                # The job did nothing wrong and a later attempt may get through.
                raise JobError(
                    f"upscaler weights could not be downloaded from {url}: {exc}", retryable=True
                ) from exc
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, dest)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.info(
        "upscaler weights %s: downloaded %d bytes to %s (sha256 %s)", url, size, dest, digest.hexdigest()
    )
    return dest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()
