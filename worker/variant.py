"""Which klein variant this worker serves: from MODEL/QUANTIZATION, a benchmark profile, or the card's
free memory.

``choose_variant`` is a pure function of (settings, GPUs, profile) so every branch is testable with
fake NVML readings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from klein_facts.profile import BenchmarkProfile, ProfileError, load_profile
from klein_facts.variants import VRAM_NEEDS, default_quantization, variant_label
from worker.boot_error import BootError
from worker.config import Settings
from worker.gpu import GIB, GpuInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    model: str  # tiny | klein-4b | klein-9b
    quantization: str  # none | fp8 | int8 | nunchaku-int4 | nunchaku-fp4
    device: str  # cpu | cuda
    reason: str

    @property
    def label(self) -> str:
        return variant_label(self.model, self.quantization)


def choose_variant(
    settings: Settings, gpus: list[GpuInfo], profile: BenchmarkProfile | None = None
) -> Variant:
    gpu = gpus[0] if gpus else None
    device = settings.device or ("cuda" if gpu else "cpu")
    if settings.model == "tiny":
        return Variant("tiny", "none", device, "MODEL=tiny")
    if gpu is None and device != "cpu":
        raise BootError(
            f"MODEL={settings.model} needs an NVIDIA GPU and none was found; use MODEL=tiny on CPU"
        )
    if settings.model != "auto":
        quant = settings.quantization
        if quant == "auto":
            quant = default_quantization(settings.model)
        return Variant(settings.model, quant, device, f"MODEL={settings.model}")
    if gpu is None:
        raise BootError(
            "MODEL=auto found no NVIDIA GPU; set MODEL=tiny to run the random-weight model on CPU"
        )
    if profile is not None:
        return _from_profile(settings, profile, gpu, device)
    return _auto(settings, gpu, device)


def _from_profile(settings: Settings, profile: BenchmarkProfile, gpu: GpuInfo, device: str) -> Variant:
    """MODEL=auto with a benchmark profile: its measured recommendation decides."""
    rec = profile.recommendation
    measured_on = profile.gpu.name if profile.gpu else "no GPU"
    if measured_on != gpu.name:
        log.warning("benchmark profile was measured on %s, this card is %s", measured_on, gpu.name)
    if not rec.fits or rec.model is None:
        raise BootError(
            f"{gpu.name}: the benchmark profile {settings.benchmark_profile} says no klein variant fits "
            f"({rec.reason})"
        )
    if rec.model == "klein-9b" and not settings.allow_non_commercial:
        raise BootError(
            "the benchmark profile recommends klein-9b, whose weights are non-commercial: set "
            "ALLOW_NON_COMMERCIAL=true or MODEL=klein-9b to accept, or benchmark klein-4b"
        )
    quant = rec.quantization or "none"
    return Variant(rec.model, quant, device, f"benchmark profile ({measured_on}): {rec.reason}")


def read_profile(settings: Settings) -> BenchmarkProfile | None:
    if not settings.benchmark_profile:
        return None
    try:
        return load_profile(settings.benchmark_profile)
    except ProfileError as exc:
        raise BootError(str(exc)) from exc


def _auto(settings: Settings, gpu: GpuInfo, device: str) -> Variant:
    """MODEL=auto without a profile: the largest variant the card's free memory holds."""
    allow_9b = settings.allow_non_commercial
    free = gpu.free_bytes / GIB
    for need in VRAM_NEEDS:
        model, quant = need.model, need.quantization
        if model == "klein-9b" and not allow_9b:
            continue
        if settings.quantization not in ("auto", quant):
            continue
        if free >= need.free_gib:
            if quant == "fp8" and not gpu.has_fp8:
                log.info("%s has no FP8 tensor cores: fp8 runs weight-only there (smaller, slower)", gpu.name)
            reason = f"{gpu.name}: {free:.1f} GiB free >= {need.free_gib:.0f} GiB needed by {model} {quant}"
            return Variant(model, quant, device, reason)
    smallest = min(VRAM_NEEDS, key=lambda n: n.free_gib)
    raise BootError(
        f"{gpu.name} has {free:.1f} GiB free of {gpu.total_gib:.1f} GiB; the smallest klein variant "
        f"({smallest.model} {smallest.quantization}) needs {smallest.free_gib:.0f} GiB. Use a card with "
        "more memory or free it."
    )
