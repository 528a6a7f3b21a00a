"""Images per second per GPU model: from benchmark profiles when present, else estimated from DLPerf.

Profiles are the JSON files ``scripts/benchmark_vram.py`` writes, read through their schema
(``klein_facts.profile``): ``gpu.name``, ``variant`` and the latencies in ``resolutions``/``batches``.
A file that is not such a profile is read tolerantly as one from another tool (docs/provisioning.md
lists the fields: ``images_per_second``, ``seconds_per_image``, ``measurements`` or ``latency``);
anything else is ignored. A file that yields no figure, or comes from the CPU ``tiny`` model, is
skipped with a warning rather than stopping the fleet.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from pydantic import BaseModel, ConfigDict, ValidationError

from klein_facts.profile import BenchmarkProfile, ProfileError, parse_profile
from provisioning.models import Instance, Offer

log = logging.getLogger(__name__)

# A rough, uncalibrated estimate: klein-4B 1024x1024 in 4 steps runs at about 0.01 image/s per Vast DLPerf
# point (RTX 3090 ~40 DLPerf ~0.4 img/s, RTX 4090 ~80 ~0.75 img/s, H100 SXM ~200 ~2 img/s). Benchmark
# profiles replace it for every GPU model they cover.
DLPERF_IMAGES_PER_SECOND = 0.01
# Used when neither a profile nor a DLPerf score is known (an instance whose GPU no profile covers).
DEFAULT_IMAGES_PER_SECOND = 0.5
REFERENCE_PIXELS = 1024 * 1024  # profiles are compared at one 1024x1024 image
# The key names that profiles from other tools use (benchmark_vram.py's own are typed in its schema).
_SECONDS_KEYS = (
    "seconds_per_image",
    "latency_s_median",
    "latency_s",
    "inference_s",
    "seconds",
    "median_s",
    "p50_s",
    "mean_s",
)
_MS_KEYS = ("latency_ms", "inference_ms", "median_ms", "p50_ms", "mean_ms", "ms")
_BATCH_KEYS = ("batch", "batch_size", "num_images", "size")
_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True, slots=True)
class ProfileFigure:
    """What the fleet takes from one profile file."""

    gpu_name: str
    model: str | None
    quantization: str | None
    images_per_second: float | None  # per GPU at 1024x1024; None: the file holds no usable figure


def read_profile(data: Any, *, source: str) -> ProfileFigure:
    """A benchmark_vram.py profile through its schema, else a profile from another tool, read
    tolerantly; a ValidationError when neither names a GPU."""
    try:
        profile = parse_profile(data, source=source)
    except ProfileError:
        profile = None
    if profile is not None and profile.gpu is not None:
        return ProfileFigure(
            gpu_name=profile.gpu.name,
            model=profile.variant.model,
            quantization=profile.variant.quantization,
            images_per_second=measured_throughput(profile),
        )
    loose = LooseProfile.model_validate(data)
    variant = loose.variant
    return ProfileFigure(
        gpu_name=loose.gpu.name,
        model=variant.model if variant else None,
        quantization=variant.quantization if variant else None,
        images_per_second=loose.throughput(),
    )


def measured_throughput(profile: BenchmarkProfile) -> float | None:
    """Images per second per GPU at 1024x1024 from a benchmark profile, None when it has no figure.

    Single-image latencies first: batches run faster per image than one-prompt jobs would. The
    worker loads the fastest variant the card holds, so the fastest successful measurement counts.
    """
    if profile.variant.model == "tiny":
        return None  # the CPU test model says nothing about a GPU's speed
    single = [
        _per_reference_image(run.latency_s_median, run.width, run.height)
        for run in profile.resolutions
        if not run.oom
    ]
    batched = [
        _per_reference_image(run.latency_s, run.width, run.height, batch=run.size)
        for run in profile.batches
        if not run.oom
    ]
    for found in (single, batched):
        seconds = [s for s in found if s is not None]
        if seconds:
            return 1.0 / min(seconds)
    return None


def _per_reference_image(
    seconds: float | None, width: Any, height: Any, *, batch: float | None = None
) -> float | None:
    """Seconds per 1024x1024 image: generation cost grows about linearly with pixels."""
    if not _is_number(seconds):
        return None
    pixels = float(width * height) if _is_number(width) and _is_number(height) else float(REFERENCE_PIXELS)
    per_image = batch if _is_number(batch) else 1.0
    return seconds / per_image * REFERENCE_PIXELS / pixels


class _Gpu(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class _Variant(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    quantization: str | None = None


class LooseProfile(BaseModel):
    """A profile from another tool (or a partial one): the few fields read, under the key names
    such tools use."""

    model_config = ConfigDict(extra="ignore")
    gpu: _Gpu
    variant: _Variant | None = None
    images_per_second: float | None = None
    seconds_per_image: float | None = None
    resolutions: list[Any] | None = None  # benchmark_vram.py's shape: {width, height, latency_s_median, oom}
    batches: list[Any] | None = None  # benchmark_vram.py's shape: {size, width, height, latency_s, oom}
    measurements: list[Any] | dict[str, Any] | None = None
    latency: float | dict[str, Any] | None = None

    def throughput(self) -> float | None:
        """Images per second per GPU at 1024x1024, or None when the profile holds no usable figure."""
        if self.variant is not None and self.variant.model == "tiny":
            return None  # the CPU test model says nothing about a GPU's speed
        if self.images_per_second and self.images_per_second > 0:
            return self.images_per_second
        if self.seconds_per_image and self.seconds_per_image > 0:
            return 1.0 / self.seconds_per_image
        # Single-image latencies first: batches run faster per image than one-prompt jobs would.
        for data in (self.resolutions, self.measurements, self.latency, self.batches):
            if (seconds := _best_seconds(data)) is not None:
                return 1.0 / seconds
        return None


def _entry_seconds(entry: Any, size_key: str | None = None) -> float | None:
    """Seconds per 1024x1024 image from one measurement (a number or a dict), None if it has none."""
    if isinstance(entry, bool) or not isinstance(entry, int | float | dict):
        return None
    if not isinstance(entry, dict):
        return _per_reference_image(float(entry), *_size(size_key))
    if entry.get("error") or entry.get("oom") or entry.get("success") is False:
        return None
    seconds = _first_number(entry, _SECONDS_KEYS)
    if seconds is None and (ms := _first_number(entry, _MS_KEYS)) is not None:
        seconds = ms / 1000.0
    width, height = entry.get("width"), entry.get("height")
    if not (_is_number(width) and _is_number(height)):
        width, height = _size(size_key)
    return _per_reference_image(seconds, width, height, batch=_first_number(entry, _BATCH_KEYS))


def _first_number(entry: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    return next((float(entry[k]) for k in keys if _is_number(entry.get(k))), None)


def _best_seconds(data: Any) -> float | None:
    if data is None:
        return None
    items: Iterable[tuple[str | None, Any]]
    if isinstance(data, dict):
        items = data.items() if any(_SIZE.match(str(k)) for k in data) else [(None, data)]
    elif isinstance(data, list):
        items = ((None, e) for e in data)
    else:
        items = [(None, data)]
    # The worker loads the fastest variant the card holds, so the fastest successful measurement counts.
    found = [s for key, entry in items if (s := _entry_seconds(entry, key)) is not None]
    return min(found) if found else None


def _size(size_key: str | None) -> tuple[int | None, int | None]:
    match = _SIZE.match(size_key or "")
    return (int(match[1]), int(match[2])) if match else (None, None)


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def normalize_gpu_name(name: str) -> str:
    """``NVIDIA GeForce RTX 4090`` and Vast's ``RTX 4090`` both become ``rtx4090``."""
    lowered = re.sub(r"\b(nvidia|geforce)\b", " ", name.lower())
    return re.sub(r"[^a-z0-9]", "", lowered)


def gpu_model_token(name: str) -> str | None:
    """The model number (``h100``, ``4090``, ``a6000``): NVML and Vast spell the rest differently."""
    for token in re.split(r"[\s_\-]+", name.lower()):
        if re.search(r"\d", token) and not re.fullmatch(r"\d+gb", token):
            return token
    return None


def load_profiles(
    directory: Path, *, model: str | None = None, quantization: str | None = None
) -> dict[str, float]:
    """Read every ``*.json`` under ``directory``: {GPU name: images per second per GPU}.

    ``model``/``quantization`` (the fleet's MODEL and QUANTIZATION, when pinned) keep only the
    profiles of that variant: an H100 runs klein-4B at 1.9 images/s and klein-9B FP8 at 1.1, and a
    9B fleet sized on the 4B figure would be short of workers.
    """
    profiles: dict[str, float] = {}
    if not directory.is_dir():
        log.warning("benchmark profile directory %s does not exist: throughput is estimated", directory)
    for path in sorted(directory.glob("*.json")):
        try:
            figure = read_profile(json.loads(path.read_text(encoding="utf-8")), source=str(path))
        except (OSError, ValueError, ValidationError) as exc:
            log.warning("skipping benchmark profile %s: %s", path, exc.__class__.__name__)
            continue
        if model and figure.model != model:
            continue
        if quantization and figure.quantization != quantization:
            continue
        ips = figure.images_per_second
        if ips is None:
            log.warning("skipping benchmark profile %s: no latency or throughput figure", path)
            continue
        # Several files for one GPU and no pinned variant (MODEL=auto; reruns): keep the fastest.
        profiles[figure.gpu_name] = max(ips, profiles.get(figure.gpu_name, 0.0))
    return profiles


@dataclass(frozen=True, slots=True)
class Estimate:
    images_per_second: float  # the whole instance (all its GPUs)
    source: str  # "profile", "dlperf estimate" or "default estimate"


class ThroughputModel:
    """Throughput of an offer or an instance, from profiles first, then DLPerf, then a default."""

    def __init__(
        self,
        *,
        profiles: Mapping[str, float] | None = None,
        dlperf_images_per_second: float = DLPERF_IMAGES_PER_SECOND,
        default_images_per_second: float = DEFAULT_IMAGES_PER_SECOND,
    ) -> None:
        self._exact = {normalize_gpu_name(k): v for k, v in (profiles or {}).items()}
        tokens: dict[str, list[float]] = {}
        for name, ips in (profiles or {}).items():
            if (token := gpu_model_token(name)) is not None:
                tokens.setdefault(token, []).append(ips)
        # A model token shared by profiles with different figures (H100 PCIe vs SXM) is ambiguous: unused.
        self._by_token = {t: v[0] for t, v in tokens.items() if len(set(v)) == 1}
        self._dlperf_factor = dlperf_images_per_second
        self._default = default_images_per_second

    def per_gpu_profile(self, gpu_name: str) -> float | None:
        exact = self._exact.get(normalize_gpu_name(gpu_name))
        if exact is not None:
            return exact
        token = gpu_model_token(gpu_name)
        return self._by_token.get(token) if token else None

    def estimate(self, *, gpu_name: str, num_gpus: int, dlperf: float | None) -> Estimate:
        gpus = max(1, num_gpus)
        profiled = self.per_gpu_profile(gpu_name)
        if profiled is not None:
            return Estimate(profiled * gpus, "profile")
        if dlperf is not None and dlperf > 0:
            return Estimate(dlperf * self._dlperf_factor, "dlperf estimate")
        return Estimate(self._default * gpus, "default estimate")

    def for_offer(self, offer: Offer) -> Estimate:
        return self.estimate(gpu_name=offer.gpu_name, num_gpus=offer.num_gpus, dlperf=offer.dlperf)

    def for_instance(self, instance: Instance) -> Estimate:
        return self.estimate(gpu_name=instance.gpu_name, num_gpus=instance.num_gpus, dlperf=instance.dlperf)
