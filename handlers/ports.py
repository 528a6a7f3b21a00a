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

    def upload(self, url: str, data: bytes, content_type: str, *, field: str = "upload_url") -> str:
        """PUT bytes to a presigned URL; return it without its query string, or raise ``UploadFailed``."""
        ...
