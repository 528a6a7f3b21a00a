"""GPU probe through NVML (nvidia-ml-py). No torch import: this runs before any engine loads."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

from klein_facts.variants import GIB

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    driver: str
    cuda: str
    compute_capability: tuple[int, int]

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def free_gib(self) -> float:
        return self.free_bytes / GIB

    @property
    def has_fp8(self) -> bool:
        """FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)."""
        return self.compute_capability >= (8, 9)


@contextmanager
def nvml(*, missing_level: int = logging.INFO) -> Iterator[ModuleType | None]:
    """NVML, initialised for the block and shut down after it; None where no NVIDIA driver answers
    (logged at ``missing_level``: a boot says so, a metrics scrape every few seconds need not)."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            log.log(missing_level, "no NVIDIA driver reachable (%s): running without a GPU", exc)
            pynvml = None
    if pynvml is None:
        yield None
        return
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def probe_gpus(visible_devices: str | None = None) -> list[GpuInfo]:
    """Every GPU visible to this process (``CUDA_VISIBLE_DEVICES`` passed in by the caller), or []."""
    with nvml() as pynvml:
        if pynvml is None:
            return []
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda_raw = pynvml.nvmlSystemGetCudaDriverVersion()
        cuda = f"{cuda_raw // 1000}.{(cuda_raw % 1000) // 10}"
        gpus = []
        for index in _visible_indices(pynvml.nvmlDeviceGetCount(), visible_devices):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    total_bytes=int(memory.total),
                    free_bytes=int(memory.free),
                    driver=driver,
                    cuda=cuda,
                    compute_capability=(int(major), int(minor)),
                )
            )
        return gpus


def _visible_indices(count: int, visible: str | None) -> list[int]:
    if visible is None or visible.strip() == "":
        return list(range(count))
    indices = []
    for part in visible.split(","):
        part = part.strip()
        if part.isdigit() and int(part) < count:
            indices.append(int(part))
    return indices


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
