"""Throughput figures read off benchmark profile files, for the fleet's sizing.

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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from pydantic import BaseModel, ConfigDict, ValidationError

from klein_facts.profile import BenchmarkProfile, ProfileError, parse_profile, serving_profile

log = logging.getLogger(__name__)

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
    """What the fleet takes from a profile file of another tool."""

    gpu_name: str
    model: str | None
    quantization: str | None
    images_per_second: float | None  # per GPU at 1024x1024; None: the file holds no usable figure


def read_profile(data: Any, *, source: str) -> BenchmarkProfile | ProfileFigure:
    """A benchmark_vram.py profile through its schema, else a profile from another tool, read
    tolerantly; a ValidationError when neither names a GPU."""
    try:
        profile = parse_profile(data, source=source)
    except ProfileError:
        profile = None
    if profile is not None and profile.gpu is not None:
        return profile
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

    Single-image latencies first: batches run faster per image than one-prompt jobs would; of those,
    the fastest successful measurement (the size the worker serves best).
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


def load_profiles(
    directory: Path,
    *,
    model: str | None = None,
    quantization: str | None = None,
    allow_non_commercial: bool = False,
    compiled: bool = True,
) -> dict[str, float]:
    """Read every ``*.json`` under ``directory``: {GPU name: images per second per GPU}.

    The figure for a GPU is that of the profile its workers serve by, chosen by the worker's own rule
    (``klein_facts.profile.serving_profile``) from the fleet's MODEL, QUANTIZATION (None: auto),
    ALLOW_NON_COMMERCIAL and TORCH_COMPILE: an H100 runs klein-4B at 1.9 images/s and klein-9B FP8 at
    1.1, and a 9B fleet sized on the 4B figure would be short of workers. Profiles from other tools
    (no fit, no compile flag) count for a GPU no benchmark_vram profile covers: the fastest of the
    pinned variant, or of any when nothing is pinned.
    """
    measured: dict[str, list[BenchmarkProfile]] = {}
    profiles: dict[str, float] = {}
    if not directory.is_dir():
        log.warning("benchmark profile directory %s does not exist: throughput is estimated", directory)
    for path in sorted(directory.glob("*.json")):
        try:
            read = read_profile(json.loads(path.read_text(encoding="utf-8")), source=str(path))
        except (OSError, ValueError, ValidationError) as exc:
            log.warning("skipping benchmark profile %s: %s", path, exc.__class__.__name__)
            continue
        if isinstance(read, BenchmarkProfile):
            measured.setdefault(read.gpu.name if read.gpu else "", []).append(read)
            continue
        if (model and read.model != model) or (quantization and read.quantization != quantization):
            continue
        if read.images_per_second is None:
            log.warning("skipping benchmark profile %s: no latency or throughput figure", path)
            continue
        profiles[read.gpu_name] = max(read.images_per_second, profiles.get(read.gpu_name, 0.0))
    for gpu_name, candidates in measured.items():
        served = serving_profile(
            candidates,
            gpu_name=gpu_name,
            model=model or "auto",
            quantization=quantization or "auto",
            allow_non_commercial=allow_non_commercial,
            compiled=compiled,
        )
        ips = measured_throughput(served) if served is not None else None
        if ips is not None:
            profiles[gpu_name] = ips
    return profiles
