"""LoRA adapter files: fetched per job, kept on disk by content hash under an LRU byte budget.

A job names its adapters by URL (usually presigned, so the same file arrives under a different
URL each time) or by hub repo; the URL says nothing reliable about the content, so every job
fetches its adapters and the file's SHA-256 is its identity. That hash names the file on disk
and the adapter loaded in the transformer (``handlers.engines.lora``): a repeated adapter costs
its download, never a second parse and load. No torch here: this is plain file keeping.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from handlers.ports import Transfer
from handlers.schemas import LoraRef

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class AdapterFile:
    """One job's adapter on disk: where, its content hash, the job's scale and the field to blame."""

    path: Path
    sha256: str
    scale: float
    field: str


class LoraFiles:
    """Adapter files in ``directory``, named ``<sha256>.safetensors``, at most ``budget_bytes`` in all.

    Least recently used files go first when a new one would exceed the budget (the newest file
    always stays, even alone above the budget: the job in hand needs it). Use refreshes a file's
    mtime, which is the LRU order, so the order survives a restart with a persistent folder.
    """

    def __init__(self, *, directory: Path, budget_bytes: int, max_file_bytes: int) -> None:
        self.directory = directory
        self.budget_bytes = budget_bytes
        self.max_file_bytes = max_file_bytes
        self._lock = threading.Lock()  # two jobs in hand may store at once
        self._clock = 0
        directory.mkdir(parents=True, exist_ok=True)

    def fetch(self, loras: Sequence[LoraRef], *, transfer: Transfer) -> list[AdapterFile]:
        """Download each adapter of a job (guarded, capped at ``max_file_bytes``) and store it."""
        files = []
        for index, lora in enumerate(loras):
            field = f"input.loras[{index}]"
            if lora.url is not None:
                data = transfer.download_file(
                    lora.url, field=f"{field}.url", max_bytes=self.max_file_bytes, limit_name="MAX_LORA_BYTES"
                )
            else:
                assert lora.repo is not None  # the schema allows exactly one of url/repo
                data = transfer.download_hub_file(
                    lora.repo, lora.weight_name, field=field, max_bytes=self.max_file_bytes
                )
            sha256, path = self.store(data)
            files.append(AdapterFile(path=path, sha256=sha256, scale=lora.scale, field=field))
        return files

    def store(self, data: bytes) -> tuple[str, Path]:
        """Keep ``data`` under its hash (written once, atomically) and return (hash, path)."""
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.directory / f"{sha256}{SUFFIX}"
        with self._lock:
            if path.exists():
                self._mark_used(path)
            else:
                # Write-then-rename: a crash mid-write never leaves a truncated file under a valid hash.
                fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".part")
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(tmp, path)
                self._mark_used(path)
                self._evict(keep=path)
        return sha256, path

    def _mark_used(self, path: Path) -> None:
        # The kernel stamps files at a coarse tick; two uses within one tick must still order.
        self._clock = max(time.time_ns(), self._clock + 1)
        os.utime(path, ns=(self._clock, self._clock))

    def _evict(self, *, keep: Path) -> None:
        entries = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.budget_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            log.info(
                "LoRA cache: evicted %s (%d bytes) to stay under %d bytes", path.name, size, self.budget_bytes
            )
