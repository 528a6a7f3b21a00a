"""The engines a handler may use: created once at boot, passed to every handler call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from handlers.errors import JobError
from handlers.gpu_lock import TimedLock

if TYPE_CHECKING:
    from handlers.engines.klein import KleinEngine
    from handlers.engines.upscaler import Upscaler
    from handlers.lora_files import LoraFiles


@dataclass
class Engines:
    """Created once at boot and passed to every handler call.

    ``gpu`` serialises model work: the runner keeps two jobs in hand so that one job's I/O
    overlaps the other's inference, never two inferences competing for the same memory.
    With PRELOAD_MODELS=false, ``klein`` starts as None and ``load_klein`` creates it for the
    first generate job (an upscale-only worker never loads it).
    """

    klein: KleinEngine | None
    upscaler: Upscaler | None
    gpu: TimedLock = field(default_factory=TimedLock)  # also counts each job's gpu_seconds
    load_klein: Callable[[], KleinEngine] | None = None
    label: str | None = None  # the variant's name before its engine exists
    lora_files: LoraFiles | None = None  # adapter files on disk; None when MAX_LORAS=0
    boot: dict[str, Any] = field(default_factory=dict)  # boot phases (seconds) and compile-cache state

    @property
    def model_name(self) -> str:
        if self.klein is not None:
            return self.klein.name
        return self.label or "none"

    @property
    def can_generate(self) -> bool:
        return self.klein is not None or self.load_klein is not None

    def generation_engine(self) -> KleinEngine:
        """The klein engine, created on first use when it was not preloaded. Call with ``gpu``
        held: loading takes the GPU's memory and time like an inference does."""
        if self.klein is None:
            if self.load_klein is None:
                raise JobError("this worker has no generation model", code="internal", retryable=True)
            self.klein = self.load_klein()
            self.load_klein = None
        return self.klein

    def free_memory(self) -> None:
        if self.klein is not None:
            self.klein.free_memory()
