"""GPU out-of-memory: recognised without importing torch, memory freed, turned into ``out_of_memory``."""

from __future__ import annotations

import sys

from handlers.engine_set import Engines
from handlers.errors import OutOfMemory


def is_oom(exc: BaseException) -> bool:
    """True for a GPU out-of-memory error, without importing torch here (handlers stay torch-free)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def oom_error(engines: Engines, what: str) -> OutOfMemory:
    engines.free_memory()
    return OutOfMemory(f"GPU out of memory while {what}; ask for a smaller size or fewer references/images")
