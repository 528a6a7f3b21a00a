"""What a handler needs from the outside world, as protocols.

The worker passes real implementations in (``worker.transfer.TransferClient``); handlers
depend only on these shapes, which keeps the import direction worker -> handlers.
"""

from __future__ import annotations

from typing import Protocol

from PIL import Image


class Transfer(Protocol):
    def download_image(self, url: str, *, field: str = "images") -> Image.Image:
        """Fetch and decode an image, or raise ``DownloadFailed`` / ``InvalidInput``."""
        ...

    def download_file(self, url: str, *, field: str, max_bytes: int, limit_name: str) -> bytes:
        """Fetch any file (a LoRA adapter) through the same guard, capped at ``max_bytes``."""
        ...

    def download_hub_file(self, repo: str, filename: str, *, field: str, max_bytes: int) -> bytes:
        """A file from a Hugging Face repo, or ``InvalidInput`` where the worker has no hub access."""
        ...

    def upload(self, url: str, data: bytes, content_type: str, *, field: str = "upload_url") -> str:
        """PUT bytes to a presigned URL; return it without its query string, or raise ``UploadFailed``."""
        ...
