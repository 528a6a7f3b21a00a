"""The measurements behind a benchmark profile, on a loaded klein engine and upscaler.

``scripts/benchmark_vram.py`` parses the command line, builds the engines and prints the table;
this module measures (VRAM at rest, per-size latency and peaks, the reference and batch series
until the first out-of-memory, the upscaler) and returns the ``BenchmarkProfile`` the worker
reads as ``BENCHMARK_PROFILE``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from handlers.engines.klein import KleinEngine
from handlers.engines.upscaler import Upscaler
from worker.profile import (
    BatchRun,
    BenchmarkProfile,
    GpuSection,
    ReferenceRun,
    ResolutionRun,
    RestVram,
    RunSettings,
    SoftwareSection,
    UpscalerRun,
    VariantSection,
    derive_limits,
    recommend,
    size_key,
    target_size,
)

logger = logging.getLogger("benchmark_vram")

PROMPT = "a red fox in a snowy birch forest at dawn, photo, 85mm, shallow depth of field"

Advance = Callable[[int], None]


class Meter:
    """Peak and used memory of one CUDA device; every figure is None on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.nvml_ok = True

    def start(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return time.perf_counter()

    def stop(self, started: float) -> tuple[float, int | None, int | None]:
        """(seconds since ``started``, torch's peak allocation, NVML's used memory)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - started
        if not self.cuda:
            return elapsed, None, None
        return elapsed, int(torch.cuda.max_memory_allocated(self.device)), self.nvml_used()

    def nvml_used(self) -> int | None:
        if not self.cuda or not self.nvml_ok:
            return None
        try:  # torch maps CUDA_VISIBLE_DEVICES to the NVML index itself
            return int(torch.cuda.device_memory_used(self.device))
        except _nvml_errors() as exc:
            logger.warning("NVML used memory unavailable, recording only torch's figures: %s", exc)
            self.nvml_ok = False
            return None

    def free(self, engine: KleinEngine, *, after_oom: bool) -> None:
        """Hand cached blocks back between measurements (on a CPU only after an OOM: gc is slow)."""
        if self.cuda or after_oom:
            engine.free_memory()

    def rest(self) -> RestVram | None:
        if not self.cuda:
            return None
        gc.collect()
        torch.cuda.empty_cache()
        return RestVram(
            torch_allocated_bytes=int(torch.cuda.memory_allocated(self.device)),
            nvml_used_bytes=self.nvml_used(),
        )


def _nvml_errors() -> tuple[type[Exception], ...]:
    try:
        from pynvml import NVMLError
    except ImportError:
        return (ImportError, RuntimeError)
    return (ImportError, RuntimeError, NVMLError)


def reference_images(count: int, side: int) -> list[Image.Image]:
    """Noisy gradients: worst-case (full 1024x1024 token count) references, deterministic."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    images = []
    for index in range(count):
        base = (ramp[None, :, None] + ramp[:, None, None] * (index % 3)) / (1 + index % 3)
        noise = rng.normal(0, 24, size=(side, side, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB"))
    return images


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


def run_benchmark(
    engine: KleinEngine, upscaler: Upscaler, args: argparse.Namespace, *, compile_s: float | None = None
) -> BenchmarkProfile:
    """Every measurement on the loaded ``engine``, then the limits and the recommendation.

    ``compile_s``: the boot already compiled and warmed the engine (through the compile cache) in
    that time; else a compiled engine is warmed here, before anything is timed."""
    meter = Meter(engine.device)
    gpu = gpu_section(engine.device)
    compile_warmup_s = compile_s
    if engine.compiled and compile_s is None:  # pay the compile before anything is timed, as boot does
        started = time.perf_counter()
        engine.warm_up()
        compile_warmup_s = round(time.perf_counter() - started, 2)
        logger.info("compiled engine warmed up in %.1f s", compile_warmup_s)
    rest = meter.rest()
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


def profile_identity(
    args: argparse.Namespace,
    device: torch.device,
    gpu: GpuSection | None,
    *,
    compiled: bool = False,
    compile_warmup_s: float | None = None,
) -> dict[str, Any]:
    from worker.boot import Variant

    variant = Variant(args.model, args.quantization, device.type, "benchmark")
    return {
        "created_at": datetime.now(UTC),
        "gpu": gpu,
        "software": SoftwareSection(
            python=platform.python_version(),
            torch=torch.__version__,
            diffusers=_version("diffusers") or "?",
            transformers=_version("transformers"),
            torchao=_version("torchao"),
            torch_cuda=torch.version.cuda,
        ),
        "variant": VariantSection(
            model=args.model,
            quantization=args.quantization,
            label=variant.label,
            device=str(device),
            random_weights=bool(args.random_weights and args.model != "tiny"),
        ),
        "settings": RunSettings(
            steps=args.steps,
            runs=args.runs,
            reference_side=args.ref_side,
            compiled=compiled,
            compile_warmup_s=compile_warmup_s,
        ),
    }


def gpu_section(device: torch.device) -> GpuSection | None:
    if device.type != "cuda":
        return None
    from worker.config import Settings
    from worker.gpu import probe_gpus

    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    probed = probe_gpus(Settings().cuda_visible_devices)
    nvml = probed[index] if index < len(probed) else None
    return GpuSection(
        name=nvml.name if nvml else props.name,
        total_bytes=nvml.total_bytes if nvml else int(props.total_memory),
        driver=nvml.driver if nvml else None,
        cuda=nvml.cuda if nvml else torch.version.cuda,
        compute_capability=(props.major, props.minor),
    )


def _max(values) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
