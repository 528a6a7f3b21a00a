"""Which klein variant this worker serves: from MODEL/QUANTIZATION, a benchmark profile, or the card's
free memory.

BENCHMARK_PROFILE names one profile file, or a folder of them (say one per card and variant, baked into
the image): from a folder the worker goes by the profiles measured on its own card, and among the
variants that fit it takes the largest model and, for that model, the quantization that served fastest
(FP8 is not always faster: on an 80 GB card 9B BF16 beat 9B FP8).

``choose_profile`` and ``choose_variant`` are pure functions of (settings, GPUs, profiles) so every
branch is testable with fake NVML readings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from klein_facts.profile import BenchmarkProfile, ProfileError, fits_itself, load_profile, serving_profile
from klein_facts.variants import (
    GIB,
    VRAM_NEEDS,
    Quantization,
    default_quantization,
    licensed,
    variant_label,
)
from worker.boot_error import BootError
from worker.config import Settings
from worker.gpu import GpuInfo, probe_gpus

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
        # Random weights have no precision to pick, so "auto" is full precision; a quantization
        # named is applied (on a CPU: torchao's int8, or FP8 weights), so the quantized path a
        # deployment takes runs on the tiny model too.
        named = "none" if settings.quantization == "auto" else settings.quantization
        return Variant("tiny", named, device, "MODEL=tiny")
    if gpu is None and device != "cpu":
        raise BootError(
            f"MODEL={settings.model} needs an NVIDIA GPU and none was found; use MODEL=tiny on CPU"
        )
    if settings.model != "auto":
        quant = settings.quantization
        if quant == "auto":
            quant = measured_quantization(profile, settings.model) or default_quantization(settings.model)
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
    if not licensed(rec.model, allow_non_commercial=settings.allow_non_commercial):
        raise BootError(
            "the benchmark profile recommends klein-9b, whose weights are non-commercial: set "
            "ALLOW_NON_COMMERCIAL=true or MODEL=klein-9b to accept, or benchmark klein-4b"
        )
    quant = rec.quantization or "none"
    return Variant(rec.model, quant, device, f"benchmark profile ({measured_on}): {rec.reason}")


def read_profile(settings: Settings, gpus: list[GpuInfo] | None = None) -> BenchmarkProfile | None:
    """The profile this worker goes by: BENCHMARK_PROFILE's file, or the one ``choose_profile`` takes
    from its folder for this card (``gpus``: probed through NVML when not given)."""
    if not settings.benchmark_profile:
        return None
    profiles = read_profiles(settings.benchmark_profile)
    if not Path(settings.benchmark_profile).is_dir():
        return profiles[0]
    if gpus is None:
        gpus = probe_gpus(settings.cuda_visible_devices)
    return choose_profile(settings, gpus, profiles)


def read_profiles(path: str) -> list[BenchmarkProfile]:
    """The profile file at ``path``, or every ``*.json`` in the folder it names (in name order)."""
    folder = Path(path)
    files = sorted(folder.glob("*.json")) if folder.is_dir() else [folder]
    if not files:
        raise BootError(f"BENCHMARK_PROFILE={path}: the folder holds no *.json benchmark profile")
    try:
        return [load_profile(file) for file in files]
    except ProfileError as exc:
        raise BootError(str(exc)) from exc


def choose_profile(
    settings: Settings, gpus: list[GpuInfo], profiles: Sequence[BenchmarkProfile]
) -> BenchmarkProfile | None:
    """From a folder's profiles, the one to serve by on this card (``serving_profile``'s rule); None
    when none was measured on it or none fits what MODEL/QUANTIZATION/ALLOW_NON_COMMERCIAL allow (the
    free-memory rule decides)."""
    gpu = gpus[0] if gpus else None
    if gpu is None:
        return None
    return serving_profile(
        profiles,
        gpu_name=gpu.name,
        model=settings.model,
        quantization=settings.quantization,
        allow_non_commercial=settings.allow_non_commercial,
        compiled=settings.torch_compile is not False,  # compiled on a GPU unless TORCH_COMPILE=false
    )


def measured_quantization(profile: BenchmarkProfile | None, model: str) -> Quantization | None:
    """QUANTIZATION=auto with MODEL pinned: the quantization a profile of that model measured fitting."""
    if profile is None or profile.variant.model != model or not fits_itself(profile):
        return None
    return profile.variant.quantization


def _auto(settings: Settings, gpu: GpuInfo, device: str) -> Variant:
    """MODEL=auto without a profile: the largest variant the card's free memory holds."""
    allow_9b = settings.allow_non_commercial
    free = gpu.free_bytes / GIB
    for need in VRAM_NEEDS:
        model, quant = need.model, need.quantization
        if not licensed(model, allow_non_commercial=allow_9b):
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
