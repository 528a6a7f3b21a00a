"""The measurements of the VRAM benchmark on a loaded engine: per output size, the reference-count and
batch-size series (each ended by the first out-of-memory, which is recorded), and the upscaler."""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import torch
from PIL import Image

from handlers.engines.klein import KleinEngine
from handlers.engines.upscaler import Upscaler
from klein_facts.profile import ResolutionRun, UpscalerRun, size_key
from measurement.meter import Meter
from measurement.workload import PROMPT, reference_images

logger = logging.getLogger("benchmark_vram")

Advance = Callable[[int], None]


def generate_once(
    engine: KleinEngine,
    meter: Meter,
    *,
    size: tuple[int, int],
    batch: int,
    references: list[Image.Image],
    steps: int,
) -> tuple[float, int | None, int | None]:
    started = meter.start()
    engine.generate(
        prompts=[PROMPT] * batch,
        seeds=list(range(batch)),
        references=references,
        width=size[0],
        height=size[1],
        num_steps=steps,
        guidance_scale=1.0,
    )
    return meter.stop(started)


def measure_resolutions(
    engine: KleinEngine, meter: Meter, args: argparse.Namespace, advance: Advance
) -> list[ResolutionRun]:
    """Per size: one warm-up, then ``--runs`` timed runs; an OOM marks the size and moves on."""
    results = []
    for size in args.resolutions:
        run = ResolutionRun(width=size[0], height=size[1])
        timings: list[tuple[float, int | None, int | None]] = []
        try:
            for _ in range(1 + args.runs):
                timings.append(
                    generate_once(engine, meter, size=size, batch=1, references=[], steps=args.steps)
                )
                advance(1)
        except torch.OutOfMemoryError:
            logger.warning("out of memory at %s", size_key(*size))
            run.oom = True
            advance(1 + args.runs - len(timings))
        meter.free(engine, after_oom=run.oom)  # NVML then reflects the next size alone
        timed = timings[1:]
        if timed:
            run.latency_s_all = [round(t[0], 4) for t in timed]
            run.latency_s_median = round(statistics.median(run.latency_s_all), 4)
            run.peak_torch_bytes = _max(t[1] for t in timings)
            run.peak_nvml_bytes = _max(t[2] for t in timings)
        results.append(run)
    return results


def measure_series(
    engine: KleinEngine,
    meter: Meter,
    args: argparse.Namespace,
    advance: Advance,
    *,
    kind: str,
    size: tuple[int, int],
) -> list[dict[str, Any]]:
    """Reference counts (kind "refs") or batch sizes ("batches") in increasing order, one warm-up
    and one timed run each, until the first OOM, which is recorded and ends the series. Returns
    the points' fields."""
    counts: list[int] = args.refs if kind == "refs" else args.batches
    images = reference_images(max(counts, default=0), args.ref_side) if kind == "refs" else []
    results = []
    for index, count in enumerate(counts):
        refs, batch = (images[:count], 1) if kind == "refs" else ([], count)
        fields: dict[str, Any] = {"count": count, "width": size[0], "height": size[1]}
        try:
            # Each point warmed before it is timed: a new shape's first call pays lazy init, cuDNN
            # autotuning (and on a compiled engine the eager fallback's first run), not inference.
            runs = [
                generate_once(engine, meter, size=size, batch=batch, references=refs, steps=args.steps)
                for _ in range(2)
            ]
            fields.update(
                latency_s=round(runs[1][0], 4),
                peak_torch_bytes=_max(run[1] for run in runs),
                peak_nvml_bytes=_max(run[2] for run in runs),
            )
        except torch.OutOfMemoryError:
            logger.warning("out of memory at %s %d at %s", kind, count, size_key(*size))
            fields["oom"] = True
        meter.free(engine, after_oom=bool(fields.get("oom")))
        results.append(fields)
        advance(1)
        if fields.get("oom"):
            advance(len(counts) - index - 1)
            break
    return results


def measure_upscaler(
    upscaler: Upscaler, meter: Meter, args: argparse.Namespace, advance: Advance
) -> list[UpscalerRun]:
    """x2 and x4 on a square input, klein resident: load + warm-up, then ``--runs`` timed runs."""
    side = args.upscale_input
    image = reference_images(1, side)[0] if side else None
    results = []
    for scale in (2, 4):
        run = UpscalerRun(scale=scale, input=side)
        try:
            if image is None:
                raise LookupError("skipped (--upscale-input 0)")
            if scale not in upscaler.sources:
                raise LookupError("no weights configured (UPSCALER_WEIGHTS_X2/_X4)")
            run.load_s = round(upscaler.ensure_loaded(scale), 4)
            upscaler.upscale(image, scale)  # warm-up: kernel selection for this shape
            timings = []
            for _ in range(args.runs):
                started = meter.start()
                upscaler.upscale(image, scale)
                timings.append(meter.stop(started))
            run.latency_s = round(statistics.median(t[0] for t in timings), 4)
            run.peak_torch_bytes = _max(t[1] for t in timings)
        except torch.OutOfMemoryError:
            run.error = "out of memory"
        except (LookupError, NotImplementedError, FileNotFoundError, ValueError) as exc:
            run.error = str(exc).strip("'\"")
        upscaler.release()
        results.append(run)
        advance(1)
    return results


def _max(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None
