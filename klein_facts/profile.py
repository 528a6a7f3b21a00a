"""The benchmark profile schema: what ``scripts/benchmark_vram.py`` measured on a card, and the limits
it implies.

The benchmark writes it (``measurement/``); the worker reads it (``BENCHMARK_PROFILE``) at boot for the
model choice and the ``MAX_REFERENCES``/``MAX_BATCH`` defaults; the provisioning CLI reads its latencies
for the fleet's throughput. No torch here: the worker loads the profile before any engine exists, and
the provisioning install has no torch at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from klein_facts.jobs import DEFAULT_HEIGHT, DEFAULT_WIDTH
from klein_facts.variants import VRAM_NEEDS, Model, Quantization, licensed

SCHEMA_VERSION: Literal[1] = 1


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
    model: Model
    quantization: Quantization
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


class Peaks:
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


class _Run(_Model, Peaks):
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
    max_references: dict[str, int] = Field(default_factory=dict)  # "WxH" (size_key) -> count
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
    return parse_profile(data, source=str(path))


def parse_profile(data: object, *, source: str) -> BenchmarkProfile:
    """Validate already-decoded JSON; ``source`` (a file name) starts the error message."""
    try:
        return BenchmarkProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(root)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ProfileError(f"benchmark profile {source}: {problems}") from exc


def size_key(width: int, height: int) -> str:
    """The ``"WxH"`` key of ``Limits.max_references``."""
    return f"{width}x{height}"


def served_latency(profile: BenchmarkProfile) -> float | None:
    """Median seconds per image at the default job size (1024x1024), as the profile measured it; None
    when that size was not measured or ran out of memory."""
    for run in profile.resolutions:
        if (run.width, run.height) == (DEFAULT_WIDTH, DEFAULT_HEIGHT) and not run.oom:
            return run.latency_s_median
    return None


def fits_itself(profile: BenchmarkProfile) -> bool:
    """The measured variant fits the card it was measured on (its recommendation is itself)."""
    rec = profile.recommendation
    return rec.fits and (rec.model, rec.quantization) == (profile.variant.model, profile.variant.quantization)


# MODEL=auto's preference, largest model first: the VRAM table's order.
LARGEST_FIRST: tuple[str, ...] = tuple(dict.fromkeys(need.model for need in VRAM_NEEDS))


def serving_profile(
    profiles: Iterable[BenchmarkProfile],
    *,
    gpu_name: str,
    model: str = "auto",
    quantization: str = "auto",
    allow_non_commercial: bool = False,
    compiled: bool = True,
) -> BenchmarkProfile | None:
    """Of profiles measured on several cards and variants, the one a worker on ``gpu_name`` serves by,
    given its MODEL, QUANTIZATION, ALLOW_NON_COMMERCIAL and whether it compiles: among the variants
    measured fitting on that card and allowed, the largest model, and for that model the quantization
    that was fastest at 1024x1024, measured the way the worker runs (compiled or eager) first. None when
    no profile qualifies. The worker's model choice and the fleet's sizing both go by this one rule."""

    def allowed(p: BenchmarkProfile) -> bool:
        m, q = p.variant.model, p.variant.quantization
        return (
            m in LARGEST_FIRST
            and model in ("auto", m)
            and quantization in ("auto", q)
            and licensed(m, allow_non_commercial=allow_non_commercial, pinned=model)
        )

    usable = [
        p for p in profiles if p.gpu is not None and p.gpu.name == gpu_name and fits_itself(p) and allowed(p)
    ]
    if not usable:
        return None
    largest = min(LARGEST_FIRST.index(p.variant.model) for p in usable)
    of_model = [p for p in usable if LARGEST_FIRST.index(p.variant.model) == largest]

    def served(p: BenchmarkProfile) -> tuple[bool, bool, float]:
        latency = served_latency(p)  # a profile without the figure comes last
        return (p.settings.compiled != compiled, latency is None, latency or 0.0)

    return min(of_model, key=served)
