"""The benchmark profile: what ``scripts/benchmark_vram.py`` measured on a card, and the limits it implies.

The script writes it; the worker reads it (``BENCHMARK_PROFILE``) for the model choice and the
``MAX_REFERENCES``/``MAX_BATCH`` defaults. No torch here: the worker loads the profile before any
engine exists. ``derive_limits`` and ``recommend`` are pure functions of the measurements.

Headroom rule: a measurement counts as fitting only if its peak (the larger of torch's peak
allocation and NVML's used memory) leaves ``max(10% of the card, 1.5 GiB)`` free. That margin
absorbs allocator fragmentation, other processes' contexts, and prompts or reference sizes a
little heavier than the benchmark's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION: Literal[1] = 1
GIB = 1024**3

HEADROOM_FRACTION = 0.10
HEADROOM_MIN_BYTES = int(1.5 * GIB)
# Settings.max_batch's upper bound: a profile never suggests more than the worker accepts.
MAX_BATCH_CAP = 64
# The size max_references_default describes: the API's default output size.
DEFAULT_SIZE = (1024, 1024)

# Next smaller variant to suggest when one does not fit (SPEC section 3's ladder).
SMALLER: dict[tuple[str, str], tuple[str, str]] = {
    ("klein-9b", "none"): ("klein-9b", "fp8"),
    ("klein-9b", "int8"): ("klein-9b", "fp8"),
    ("klein-9b", "fp8"): ("klein-4b", "none"),
    ("klein-4b", "none"): ("klein-4b", "fp8"),
    ("klein-4b", "int8"): ("klein-4b", "fp8"),
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuSection(_Model):
    name: str
    total_bytes: int
    driver: str | None = None
    cuda: str | None = None  # the driver's CUDA version (NVML); software.torch_cuda is the runtime's
    compute_capability: tuple[int, int] | None = None


class SoftwareSection(_Model):
    python: str
    torch: str
    diffusers: str
    transformers: str | None = None
    torchao: str | None = None
    torch_cuda: str | None = None


class VariantSection(_Model):
    model: Literal["tiny", "klein-4b", "klein-9b"]
    quantization: str
    label: str
    device: str
    random_weights: bool = False


class RunSettings(_Model):
    steps: int
    runs: int
    reference_side: int
    compiled: bool = False  # --compile: measured as the worker serves on CUDA (TORCH_COMPILE)
    compile_warmup_s: float | None = None  # what compiling cost before the measurements


class RestVram(_Model):
    torch_allocated_bytes: int | None = None
    nvml_used_bytes: int | None = None


class _Peaks:
    """What a generation held on the card; every figure is None on a CPU."""

    if TYPE_CHECKING:  # declared by the pydantic model that mixes this in
        peak_torch_bytes: int | None
        peak_nvml_bytes: int | None
        oom: bool

    @property
    def peak_bytes(self) -> int | None:
        """The larger of the two peaks: what the card really had to hold."""
        values = [v for v in (self.peak_torch_bytes, self.peak_nvml_bytes) if v is not None]
        return max(values) if values else None


class _Run(_Model, _Peaks):
    """One generation setting measured at one output size."""

    width: int
    height: int
    peak_torch_bytes: int | None = None
    peak_nvml_bytes: int | None = None  # sampled after the run, while the allocator holds its blocks
    oom: bool = False


class ResolutionRun(_Run):
    latency_s_median: float | None = None
    latency_s_all: list[float] = Field(default_factory=list)


class ReferenceRun(_Run):
    count: int
    latency_s: float | None = None


class BatchRun(_Run):
    size: int
    latency_s: float | None = None


class UpscalerRun(_Model):
    scale: int
    input: int  # side of the square input image, px
    latency_s: float | None = None
    load_s: float | None = None
    peak_torch_bytes: int | None = None  # klein resident, as in the worker
    error: str | None = None


class Limits(_Model):
    headroom_bytes: int | None = None  # None on CPU: no memory limit was measured
    max_references: dict[str, int] = Field(default_factory=dict)  # "WxH" -> count
    max_references_estimated: list[str] = Field(default_factory=list)  # keys not measured directly
    max_references_default: int | None = None
    max_batch: int | None = None
    bytes_per_reference: int | None = None
    seconds_per_reference: float | None = None


class Recommendation(_Model):
    fits: bool
    model: str | None = None
    quantization: str | None = None
    reason: str


class BenchmarkProfile(_Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    created_at: datetime
    gpu: GpuSection | None = None
    software: SoftwareSection
    variant: VariantSection
    settings: RunSettings
    rest_vram: RestVram | None = None
    resolutions: list[ResolutionRun] = Field(default_factory=list)
    references: list[ReferenceRun] = Field(default_factory=list)
    batches: list[BatchRun] = Field(default_factory=list)
    upscaler: list[UpscalerRun] = Field(default_factory=list)
    limits: Limits
    recommendation: Recommendation


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the field."""


def load_profile(path: str | Path) -> BenchmarkProfile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProfileError(f"benchmark profile {path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"benchmark profile {path}: not JSON ({exc.msg} at line {exc.lineno})") from exc
    try:
        return BenchmarkProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(root)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ProfileError(f"benchmark profile {path}: {problems}") from exc


def size_key(width: int, height: int) -> str:
    return f"{width}x{height}"


def headroom_bytes(total_bytes: int) -> int:
    return max(int(total_bytes * HEADROOM_FRACTION), HEADROOM_MIN_BYTES)


def target_size(sizes: list[tuple[int, int]]) -> tuple[int, int] | None:
    """1024x1024 when asked for, else the largest size asked: the one ``fits`` is judged on."""
    if not sizes:
        return None
    return DEFAULT_SIZE if DEFAULT_SIZE in sizes else max(sizes, key=lambda s: (s[0] * s[1], s))


def _fits(run: _Peaks, budget: int | None) -> bool:
    if run.oom:
        return False
    peak = run.peak_bytes
    return budget is None or peak is None or peak <= budget


def _longest_fitting(runs: Iterable[tuple[int, _Peaks]], budget: int | None) -> int:
    """The largest count of a series such that it and every smaller count fit (0 if none)."""
    best = 0
    for count, run in sorted(runs, key=lambda item: item[0]):
        if not _fits(run, budget):
            break
        best = count
    return best


def _slope(series: list[ReferenceRun]) -> tuple[int | None, float | None]:
    """Extra bytes and seconds per reference, between the smallest and largest count that ran."""
    ran = sorted((r for r in series if not r.oom), key=lambda r: r.count)
    if len(ran) < 2 or ran[-1].count == ran[0].count:
        return None, None
    first, last = ran[0], ran[-1]
    span = last.count - first.count
    per_bytes = None
    if first.peak_bytes is not None and last.peak_bytes is not None:
        per_bytes = max(0, (last.peak_bytes - first.peak_bytes) // span)
    per_seconds = None
    if first.latency_s is not None and last.latency_s is not None:
        per_seconds = max(0.0, (last.latency_s - first.latency_s) / span)
    return per_bytes, per_seconds


def derive_limits(
    *,
    total_bytes: int | None,
    resolutions: list[ResolutionRun],
    references: list[ReferenceRun],
    batches: list[BatchRun],
) -> Limits:
    """Max references per output size and max batch that fit with headroom (no limit on CPU).

    Sizes with a measured reference series get the longest prefix of that series that fits. Other
    measured sizes are estimated: their own zero-reference peak plus the measured bytes per
    reference, never above the largest count measured anywhere. ``max_batch`` is the longest
    fitting prefix of the batch series.
    """
    headroom = budget = None
    if total_bytes is not None:
        headroom = headroom_bytes(total_bytes)
        budget = total_bytes - headroom
    series: dict[str, list[ReferenceRun]] = {}
    for point in references:
        series.setdefault(size_key(point.width, point.height), []).append(point)
    max_refs = {key: _longest_fitting([(r.count, r) for r in runs], budget) for key, runs in series.items()}
    per_bytes, per_seconds = next(
        (slope for slope in map(_slope, series.values()) if slope != (None, None)), (None, None)
    )
    ceiling = max(max_refs.values(), default=0)
    estimated = []
    for run in resolutions:
        key = size_key(run.width, run.height)
        if key in max_refs or not series:
            continue
        estimated.append(key)
        max_refs[key] = _estimate(run, budget=budget, per_reference=per_bytes, ceiling=ceiling)
    max_batch = None
    if batches:
        max_batch = min(MAX_BATCH_CAP, _longest_fitting([(b.size, b) for b in batches], budget))
    return Limits(
        headroom_bytes=headroom,
        max_references=max_refs,
        max_references_estimated=estimated,
        max_references_default=_default_references(max_refs),
        max_batch=max_batch,
        bytes_per_reference=per_bytes,
        seconds_per_reference=per_seconds,
    )


def _estimate(run: ResolutionRun, *, budget: int | None, per_reference: int | None, ceiling: int) -> int:
    """References that fit on top of this size's own zero-reference peak, at most ``ceiling``."""
    base = run.peak_bytes
    if run.oom:
        return 0
    if budget is None or base is None or not per_reference:
        return ceiling
    return max(0, min(ceiling, (budget - base) // per_reference))


def _default_references(max_refs: dict[str, int]) -> int | None:
    """The limit at 1024x1024, else at the largest measured size up to 1024x1024 pixels."""
    sizes = {tuple(int(v) for v in key.split("x")): value for key, value in max_refs.items()}
    if not sizes:
        return None
    if DEFAULT_SIZE in sizes:
        return sizes[DEFAULT_SIZE]
    area = DEFAULT_SIZE[0] * DEFAULT_SIZE[1]
    small = [s for s in sizes if s[0] * s[1] <= area]
    pick = max(small, key=lambda s: s[0] * s[1]) if small else min(sizes, key=lambda s: s[0] * s[1])
    return sizes[pick]


def recommend(
    *, model: str, quantization: str, total_bytes: int | None, resolutions: list[ResolutionRun]
) -> Recommendation:
    """Does the variant fit: its target size ran without OOM and left the headroom free."""
    target = target_size([(r.width, r.height) for r in resolutions])
    run = next((r for r in resolutions if (r.width, r.height) == target), None)
    if run is None:
        return not_fitting(model, quantization, "no resolution was measured")
    key = size_key(run.width, run.height)
    if run.oom:
        return not_fitting(model, quantization, f"out of memory at {key}")
    peak = run.peak_bytes
    if total_bytes is None or peak is None:
        return Recommendation(
            fits=True, model=model, quantization=quantization, reason=f"{key} ran; no GPU memory limit"
        )
    headroom = headroom_bytes(total_bytes)
    if peak + headroom > total_bytes:
        return not_fitting(
            model,
            quantization,
            f"peak {peak / GIB:.2f} GiB at {key} + headroom {headroom / GIB:.2f} GiB "
            f"> {total_bytes / GIB:.2f} GiB",
        )
    return Recommendation(
        fits=True,
        model=model,
        quantization=quantization,
        reason=f"peak {peak / GIB:.2f} GiB at {key} leaves {(total_bytes - peak) / GIB:.2f} GiB "
        f"of {total_bytes / GIB:.2f} GiB (headroom {headroom / GIB:.2f} GiB)",
    )


def not_fitting(model: str, quantization: str, why: str) -> Recommendation:
    """fits=false, suggesting the next smaller variant (or none when there is none)."""
    smaller = SMALLER.get((model, quantization))
    hint = f"; try MODEL={smaller[0]} QUANTIZATION={smaller[1]}" if smaller else ""
    return Recommendation(
        fits=False,
        model=smaller[0] if smaller else None,
        quantization=smaller[1] if smaller else None,
        reason=f"{model} {quantization}: {why}{hint}",
    )
