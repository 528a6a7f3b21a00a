"""The limits and the recommendation a benchmark's measurements imply: pure functions of the figures.

Headroom rule: a measurement counts as fitting only if its peak (the larger of torch's peak
allocation and NVML's used memory) leaves ``max(10% of the card, 1.5 GiB)`` free. That margin
absorbs allocator fragmentation, other processes' contexts, and prompts or reference sizes a
little heavier than the benchmark's.
"""

from __future__ import annotations

from collections.abc import Iterable

from klein_facts.jobs import (  # a profile never suggests more than the worker accepts
    DEFAULT_HEIGHT,
    DEFAULT_WIDTH,
    MAX_BATCH_CAP,
)
from klein_facts.profile import BatchRun, Limits, Peaks, Recommendation, ReferenceRun, ResolutionRun, size_key
from klein_facts.variants import GIB, smaller_variant

HEADROOM_FRACTION = 0.10
HEADROOM_MIN_BYTES = int(1.5 * GIB)
# The size max_references_default describes: the API's default output size.
DEFAULT_SIZE = (DEFAULT_WIDTH, DEFAULT_HEIGHT)


def headroom_bytes(total_bytes: int) -> int:
    return max(int(total_bytes * HEADROOM_FRACTION), HEADROOM_MIN_BYTES)


def target_size(sizes: list[tuple[int, int]]) -> tuple[int, int] | None:
    """1024x1024 when asked for, else the largest size asked: the one ``fits`` is judged on."""
    if not sizes:
        return None
    return DEFAULT_SIZE if DEFAULT_SIZE in sizes else max(sizes, key=lambda s: (s[0] * s[1], s))


def _fits(run: Peaks, budget: int | None) -> bool:
    if run.oom:
        return False
    peak = run.peak_bytes
    return budget is None or peak is None or peak <= budget


def _longest_fitting(runs: Iterable[tuple[int, Peaks]], budget: int | None) -> int:
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
    smaller = smaller_variant(model, quantization)
    hint = f"; try MODEL={smaller[0]} QUANTIZATION={smaller[1]}" if smaller else ""
    return Recommendation(
        fits=False,
        model=smaller[0] if smaller else None,
        quantization=smaller[1] if smaller else None,
        reason=f"{model} {quantization}: {why}{hint}",
    )
