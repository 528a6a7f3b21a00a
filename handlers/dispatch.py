"""The engines a handler may use, and the job-type -> handler table."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from handlers.errors import OutOfMemory

if TYPE_CHECKING:
    from handlers.engines.klein import KleinEngine
    from handlers.engines.upscaler import Upscaler


@dataclass
class Engines:
    """Created once at boot and passed to every handler call.

    ``gpu`` serialises model work: the runner keeps two jobs in hand so that one job's I/O
    overlaps the other's inference, never two inferences competing for the same memory.
    """

    klein: KleinEngine | None
    upscaler: Upscaler | None
    gpu: threading.Lock = field(default_factory=threading.Lock)

    @property
    def model_name(self) -> str:
        return self.klein.name if self.klein is not None else "none"

    def free_memory(self) -> None:
        if self.klein is not None:
            self.klein.free_memory()


def is_oom(exc: BaseException) -> bool:
    """True for a GPU out-of-memory error, without importing torch here (handlers stay torch-free)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def oom_error(engines: Engines, what: str) -> OutOfMemory:
    engines.free_memory()
    return OutOfMemory(f"GPU out of memory while {what}; ask for a smaller size or fewer references/images")


Handler = Callable[..., Any]


def handler_table() -> dict[str, Handler]:
    from handlers.generate import generate
    from handlers.upscale import upscale

    return {"generate": generate, "upscale": upscale}
