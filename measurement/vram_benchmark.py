"""The VRAM benchmark behind ``scripts/benchmark_vram.py``: every measurement on a loaded klein engine
and upscaler (VRAM at rest, per-size latency and peaks, the reference and batch series, the upscaler),
then the ``BenchmarkProfile`` the worker reads as ``BENCHMARK_PROFILE``."""

from __future__ import annotations

import argparse
import logging
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from handlers.engines.klein import KleinEngine
from handlers.engines.upscaler import Upscaler
from klein_facts.profile import BatchRun, BenchmarkProfile, Limits, ReferenceRun
from measurement.environment import gpu_section, profile_identity
from measurement.limits import derive_limits, not_fitting, recommend, target_size
from measurement.meter import Meter
from measurement.vram_runs import measure_resolutions, measure_series, measure_upscaler

logger = logging.getLogger("benchmark_vram")


def run_benchmark(
    engine: KleinEngine,
    upscaler: Upscaler,
    args: argparse.Namespace,
    *,
    compile_s: float | None = None,
    visible_devices: str | None = None,
) -> BenchmarkProfile:
    """Every measurement on the loaded ``engine``, then the limits and the recommendation.

    ``compile_s``: the boot already compiled and warmed the engine (through the compile cache) in
    that time; else a compiled engine is warmed here, before anything is timed. ``visible_devices``:
    CUDA_VISIBLE_DEVICES, to find the card in NVML."""
    meter = Meter(engine.device)
    gpu = gpu_section(engine.device, visible_devices=visible_devices)
    compile_warmup_s = compile_s
    if engine.compiled and compile_s is None:  # pay the compile before anything is timed, as boot does
        started = time.perf_counter()
        engine.warm_up()
        compile_warmup_s = round(time.perf_counter() - started, 2)
        logger.info("compiled engine warmed up in %.1f s", compile_warmup_s)
    rest = meter.rest_vram()
    series_size = target_size(args.resolutions) or args.resolutions[0]
    total = len(args.resolutions) * (1 + args.runs) + len(args.refs) + len(args.batches) + 2
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"{args.model} {args.quantization}", total=total)

        def advance(steps: int) -> None:
            progress.advance(task, steps)

        resolutions = measure_resolutions(engine, meter, args, advance)
        points = measure_series(engine, meter, args, advance, kind="refs", size=series_size)
        references = [ReferenceRun(**point) for point in points]
        points = measure_series(engine, meter, args, advance, kind="batches", size=series_size)
        batches = [BatchRun(size=point.pop("count"), **point) for point in points]
        upscaled = measure_upscaler(upscaler, meter, args, advance)
    total_bytes = gpu.total_bytes if gpu else None
    return BenchmarkProfile(
        **profile_identity(
            args, engine.device, gpu, compiled=engine.compiled, compile_warmup_s=compile_warmup_s
        ),
        rest_vram=rest,
        resolutions=resolutions,
        references=references,
        batches=batches,
        upscaler=upscaled,
        limits=derive_limits(
            total_bytes=total_bytes, resolutions=resolutions, references=references, batches=batches
        ),
        recommendation=recommend(
            model=args.model, quantization=args.quantization, total_bytes=total_bytes, resolutions=resolutions
        ),
    )


def load_failure_profile(args: argparse.Namespace, *, visible_devices: str | None = None) -> BenchmarkProfile:
    """The profile of a variant that ran out of memory while loading: it does not fit."""
    device = torch.device(args.device)
    return BenchmarkProfile(
        **profile_identity(args, device, gpu_section(device, visible_devices=visible_devices)),
        limits=Limits(),
        recommendation=not_fitting(args.model, args.quantization, "out of memory while loading"),
    )
