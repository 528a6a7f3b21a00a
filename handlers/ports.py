"""What passes between the worker and a handler, as types.

``Transfer`` is what a handler calls on the outside world; the worker passes the real one in
(``worker.transfer.TransferClient``). ``Finished`` is what a handler hands back: the result's
``output`` together with the job's status and stage timings, so the worker never reads them out
of the output's shape. Handlers depend only on these shapes, which keeps the import direction
worker -> handlers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from PIL import Image
from pydantic import BaseModel


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


@dataclass(frozen=True)
class Finished:
    """A handler's return: ``output`` is the result's ``output`` object (SPEC section 2);
    ``status`` is ``partial`` when some of a batch's items failed; ``timings`` holds the job's
    ``timing_*`` figures (milliseconds) for its log line and the stage metrics."""

    output: BaseModel
    status: Literal["succeeded", "partial"] = "succeeded"
    timings: Mapping[str, int] = field(default_factory=dict)
