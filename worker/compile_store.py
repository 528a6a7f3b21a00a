"""Where compiled-engine bundles are kept: a local folder and/or an S3 prefix (COMPILE_CACHE).

The engine side (``handlers.engines.compile_cache``) turns the process's compile caches into bytes
and back; this module only stores and fetches those bytes by name, so the engine code never sees
S3. Lookups go through the stores in order (the folder first: it is on the instance disk and
survives a Vast stop/start) and a hit from a later store is copied into the earlier ones, so the
next boot of this machine reads its own disk. Any failure to read or write is a warning and a
miss: a cache must never stop a worker from booting.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger(__name__)

DISABLED = ("off", "none", "false")  # COMPILE_CACHE values that turn the cache off


class BundleStore(Protocol):
    """Bytes by name. ``get`` returns None when the name is absent."""

    description: str

    def get(self, name: str) -> bytes | None: ...

    def put(self, name: str, data: bytes) -> None: ...


class FolderStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = str(root)

    def get(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def put(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # Write then rename: two workers on one box (one per GPU) may save the same bundle at once,
        # and a reader must never see half a file.
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, self.root / name)


class S3Store:
    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self._client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.description = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def get(self, name: str) -> bytes | None:
        try:
            reply = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        body: bytes = reply["Body"].read()
        return body

    def put(self, name: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)


# What a store may raise on a bad disk, a missing bucket or no network: each one is a miss.
STORE_ERRORS: tuple[type[Exception], ...] = (OSError, ClientError, BotoCoreError)


def open_stores(spec: str | None, *, default_folder: Path, s3_client: Any = None) -> list[BundleStore]:
    """The stores COMPILE_CACHE names: comma-separated folders and ``s3://bucket/prefix`` URLs.

    Unset: ``default_folder`` alone. Only S3 given: ``default_folder`` first, then S3, so a hit
    from S3 is kept on the instance disk. ``off``: no stores (compile every boot).
    ``s3_client`` is called to build the boto3 client only when an S3 URL is present.
    """
    entries = [part.strip() for part in (spec or "").split(",") if part.strip()]
    if any(entry.lower() in DISABLED for entry in entries):
        return []
    folders: list[BundleStore] = [FolderStore(Path(e).expanduser()) for e in entries if "://" not in e]
    remote: list[BundleStore] = []
    for entry in (e for e in entries if "://" in e):
        url = urlparse(entry)
        if url.scheme != "s3" or not url.netloc:
            raise ValueError(f"COMPILE_CACHE: {entry!r} is neither a folder nor s3://bucket/prefix")
        remote.append(S3Store(s3_client() if callable(s3_client) else s3_client, url.netloc, url.path))
    if not folders:
        folders = [FolderStore(default_folder)]
    return folders + remote


@dataclass
class Lookup:
    data: bytes | None
    source: str | None  # the store it came from


def fetch(stores: list[BundleStore], name: str) -> Lookup:
    """The first store that has ``name``; earlier stores that missed get a copy."""
    missed: list[BundleStore] = []
    for store in stores:
        try:
            data = store.get(name)
        except STORE_ERRORS as exc:
            log.warning("compile cache %s unreadable (%s); trying the next", store.description, exc)
            continue
        if data is None:
            missed.append(store)
            continue
        publish(missed, name, data)
        return Lookup(data, store.description)
    return Lookup(None, None)


def publish(stores: list[BundleStore], name: str, data: bytes) -> list[str]:
    """Write ``data`` to every store; returns the ones written. A failing store is a warning."""
    written = []
    for store in stores:
        try:
            store.put(name, data)
        except STORE_ERRORS as exc:
            log.warning("compile cache %s not written (%s)", store.description, exc)
            continue
        written.append(store.description)
    return written
