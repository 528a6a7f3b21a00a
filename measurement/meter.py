"""Time and memory of a block of work on one device: wall time, torch's peak allocation, NVML's used
memory, and what the card holds at rest. Every memory figure is None on a CPU."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from klein_facts.profile import RestVram
from klein_facts.variants import GIB

if TYPE_CHECKING:
    from handlers.engines.klein import KleinEngine

logger = logging.getLogger(__name__)


class Meter:
    """Peak and used memory of one CUDA device, and the wall time of calls on it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.nvml_ok = True

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def start(self) -> float:
        """Synchronise, reset the peak and return the start time for ``stop``."""
        self.sync()
        self.reset_peak()
        return time.perf_counter()

    def stop(self, started: float) -> tuple[float, int | None, int | None]:
        """(seconds since ``started``, torch's peak allocation, NVML's used memory)."""
        self.sync()
        elapsed = time.perf_counter() - started
        if not self.cuda:
            return elapsed, None, None
        return elapsed, int(torch.cuda.max_memory_allocated(self.device)), self.nvml_used()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / GIB if self.cuda else None

    def nvml_used(self) -> int | None:
        if not self.cuda or not self.nvml_ok:
            return None
        try:  # torch maps CUDA_VISIBLE_DEVICES to the NVML index itself
            return int(torch.cuda.device_memory_used(self.device))
        except _nvml_errors() as exc:
            logger.warning("NVML used memory unavailable, recording only torch's figures: %s", exc)
            self.nvml_ok = False
            return None

    def timed(self, call: Callable[[], Any], *, runs: int, warmup: int) -> tuple[list[float], float | None]:
        """Seconds of each of ``runs`` calls after ``warmup`` untimed ones, and their peak in GiB."""
        for _ in range(warmup):
            call()
        self.sync()
        self.reset_peak()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            call()
            self.sync()
            times.append(time.perf_counter() - started)
        return times, self.peak_gib()

    def free(self, engine: KleinEngine, *, after_oom: bool) -> None:
        """Hand cached blocks back between measurements (on a CPU only after an OOM: gc is slow)."""
        if self.cuda or after_oom:
            engine.free_memory()

    def rest_vram(self) -> RestVram | None:
        """What the loaded models hold with caches emptied, for a profile (None on a CPU)."""
        if not self.cuda:
            return None
        gc.collect()
        torch.cuda.empty_cache()
        return RestVram(
            torch_allocated_bytes=int(torch.cuda.memory_allocated(self.device)),
            nvml_used_bytes=self.nvml_used(),
        )

    def rest_gib(self) -> dict[str, float | None]:
        """Allocated and reserved GiB with caches emptied, for the speed report."""
        gc.collect()
        if not self.cuda:
            return {"allocated_gib": None, "reserved_gib": None}
        torch.cuda.empty_cache()
        return {
            "allocated_gib": torch.cuda.memory_allocated(self.device) / GIB,
            "reserved_gib": torch.cuda.memory_reserved(self.device) / GIB,
        }


def _nvml_errors() -> tuple[type[Exception], ...]:
    try:
        from pynvml import NVMLError
    except ImportError:
        return (ImportError, RuntimeError)
    return (ImportError, RuntimeError, NVMLError)
