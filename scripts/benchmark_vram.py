"""Pre-deploy VRAM and latency benchmark of one klein variant on this card; writes a profile.

    python scripts/benchmark_vram.py --model klein-4b --quantization none --random-weights \\
        --output profile.json

Measures VRAM at rest; per output size the median latency and peak VRAM (torch's peak allocation
and NVML's used memory, sampled after each run while the allocator still holds the run's blocks);
a reference-count series and a batch-size series at the target size (1024x1024, else the largest
size asked), each ended by the first out-of-memory, which is recorded; the upscaler's peak at
x2/x4 with klein resident. Writes the JSON profile (``worker/profile.py``) that the worker reads
as ``BENCHMARK_PROFILE``, then prints a markdown table.

Exit status: 0 the variant fits the card with headroom; 3 it does not (the profile is still
written, with ``recommendation.fits: false``); 2 usage error (bad arguments, unavailable
quantization backend). ``--model tiny`` runs on the CPU (VRAM figures null, latency real).
"""

from __future__ import annotations

import argparse
import gc
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from handlers.engines.klein import KleinEngine, UnsupportedQuantization
from handlers.engines.upscaler import Upscaler
from worker.profile import (
    GIB,
    BatchRun,
    BenchmarkProfile,
    GpuSection,
    Limits,
    ReferenceRun,
    ResolutionRun,
    RestVram,
    RunSettings,
    SoftwareSection,
    UpscalerRun,
    VariantSection,
    derive_limits,
    not_fitting,
    recommend,
    size_key,
    target_size,
)

logger = logging.getLogger("benchmark_vram")

EXIT_FITS = 0
EXIT_USAGE = 2
EXIT_DOES_NOT_FIT = 3

PROMPT = "a red fox in a snowy birch forest at dawn, photo, 85mm, shallow depth of field"
QUANTIZATIONS = ("auto", "none", "fp8", "int8", "nunchaku-int4", "nunchaku-fp4")

Advance = Callable[[int], None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=("tiny", "klein-4b", "klein-9b"))
    parser.add_argument("--quantization", default="auto", choices=QUANTIZATIONS, help="auto: fp8 for 9b")
    parser.add_argument("--random-weights", action="store_true", help="full-size architecture, no download")
    parser.add_argument("--device", default=None, help="cpu/cuda[:N]; default cpu for tiny, else cuda")
    parser.add_argument(
        "--resolutions", type=_sizes, default=_sizes("512x512,768x768,1024x768,768x1024,1024x1024")
    )
    parser.add_argument("--refs", type=_counts, default=_counts("0,1,2,4,6,8,10,12,16"))
    parser.add_argument("--batches", type=_counts, default=_counts("1,2,4,8"))
    parser.add_argument("--ref-side", type=int, default=1024, help="reference images are this square size")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per size, after one warm-up")
    parser.add_argument("--upscale-input", type=int, default=1024, help="upscaler input side; 0 skips it")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.runs < 1 or args.ref_side < 64 or args.upscale_input < 0:
        parser.error("--steps and --runs must be >= 1, --ref-side >= 64, --upscale-input >= 0")
    if args.quantization == "auto":
        args.quantization = "fp8" if args.model == "klein-9b" else "none"
    if args.model == "tiny":
        args.quantization = "none"
    args.device = args.device or ("cpu" if args.model == "tiny" else "cuda")
    if args.random_weights and args.model != "tiny" and not args.device.startswith("cuda"):
        parser.error("--random-weights builds the full-size model on a GPU: use --device cuda")
    return args


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected WxH[,WxH...], got {text!r}") from exc
    if not sizes or any(len(s) != 2 or min(s) < 64 or s[0] % 16 or s[1] % 16 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be WxH, multiples of 16, at least 64: {text!r}")
    return [(s[0], s[1]) for s in sizes]


def _counts(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N[,N...], got {text!r}") from exc
    if any(c < 0 for c in counts):
        raise argparse.ArgumentTypeError(f"counts must be >= 0: {text!r}")
    return counts


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
    """Reference counts (kind "refs") or batch sizes ("batches") in increasing order, one run
    each, until the first OOM, which is recorded and ends the series. Returns the points' fields."""
    counts: list[int] = args.refs if kind == "refs" else args.batches
    images = reference_images(max(counts, default=0), args.ref_side) if kind == "refs" else []
    results = []
    for index, count in enumerate(counts):
        refs, batch = (images[:count], 1) if kind == "refs" else ([], count)
        fields: dict[str, Any] = {"count": count, "width": size[0], "height": size[1]}
        try:
            latency, peak_torch, peak_nvml = generate_once(
                engine, meter, size=size, batch=batch, references=refs, steps=args.steps
            )
            fields.update(latency_s=round(latency, 4), peak_torch_bytes=peak_torch, peak_nvml_bytes=peak_nvml)
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


def run_benchmark(engine: KleinEngine, upscaler: Upscaler, args: argparse.Namespace) -> BenchmarkProfile:
    """Every measurement on the loaded ``engine``, then the limits and the recommendation."""
    meter = Meter(engine.device)
    gpu = gpu_section(engine.device)
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
        **_identity(args, engine.device, gpu),
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


def _identity(args: argparse.Namespace, device: torch.device, gpu: GpuSection | None) -> dict[str, Any]:
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
        "settings": RunSettings(steps=args.steps, runs=args.runs, reference_side=args.ref_side),
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


def build_engines(args: argparse.Namespace) -> tuple[KleinEngine, Upscaler]:
    """Random full-size weights, or the worker's own loading path (MODEL_PATH, HF_TOKEN, ...)."""
    if args.random_weights and args.model != "tiny":
        from handlers.engines.random_weights import create_random_klein_engine, create_random_upscaler

        engine = create_random_klein_engine(
            model=args.model, quantization=args.quantization, device=args.device
        )
        return engine, create_random_upscaler(device=args.device)
    from worker.boot import Variant
    from worker.boot import build_engines as worker_build_engines
    from worker.config import Settings

    settings = Settings(
        model=args.model, quantization=args.quantization, device=args.device, preload_models=False
    )
    engines = worker_build_engines(settings, Variant(args.model, args.quantization, args.device, "benchmark"))
    assert engines.klein is not None and engines.upscaler is not None
    return engines.klein, engines.upscaler


def markdown_table(profile: BenchmarkProfile) -> str:
    """The seed-table layout of shared/reference/flux2-klein.md, one column for this run."""
    steps = profile.settings.steps
    rows = [("card", profile.gpu.name if profile.gpu else "CPU")]
    if profile.rest_vram:
        rows.append(
            ("VRAM at rest", _gib(profile.rest_vram.torch_allocated_bytes, profile.rest_vram.nvml_used_bytes))
        )
    for run in profile.resolutions:
        key = size_key(run.width, run.height)
        rows.append(
            (f"peak VRAM {key}", "OOM" if run.oom else _gib(run.peak_torch_bytes, run.peak_nvml_bytes))
        )
        latency = "OOM" if run.oom else f"{run.latency_s_median:.3f} s"
        rows.append((f"inference {key}, {steps} steps", latency))
    limits = profile.limits
    if limits.bytes_per_reference is not None:
        rows.append(("VRAM per reference image", f"{limits.bytes_per_reference / 2**20:.0f} MiB"))
    if limits.seconds_per_reference is not None:
        rows.append(("time per extra reference", f"{limits.seconds_per_reference:.3f} s"))
    for key, value in limits.max_references.items():
        note = " (estimated)" if key in limits.max_references_estimated else ""
        rows.append((f"max references {key}", f"{value}{note}"))
    rows.append(("max batch", str(limits.max_batch)))
    for up in profile.upscaler:
        what = up.error or f"{up.latency_s:.3f} s"
        if up.peak_torch_bytes is not None:
            what += f", peak {up.peak_torch_bytes / GIB:.2f} GiB with klein resident"
        rows.append((f"upscale x{up.scale} {up.input} -> {up.input * up.scale}", what))
    rec = profile.recommendation
    rows.append(("fits", f"{'yes' if rec.fits else 'no'}: {rec.reason}"))
    header = f"| | {profile.variant.label} |\n|---|---|\n"
    return header + "\n".join(f"| {name} | {value} |" for name, value in rows)


def _gib(torch_bytes: int | None, nvml_bytes: int | None) -> str:
    if torch_bytes is None and nvml_bytes is None:
        return "n/a (CPU)"
    parts = [f"{torch_bytes / GIB:.2f} GiB torch" if torch_bytes is not None else ""]
    parts.append(f"{nvml_bytes / GIB:.2f} GiB NVML" if nvml_bytes is not None else "")
    return ", ".join(p for p in parts if p)


def _max(values) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None, *, engines: tuple[KleinEngine, Upscaler] | None = None) -> int:
    """Run the benchmark; ``engines`` replaces building them (tests pass an engine that runs out
    of memory). Returns the exit status."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help 0
        return int(exc.code or 0)
    console = Console(stderr=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    if engines is None and args.device.startswith("cuda") and not torch.cuda.is_available():
        console.print(f"[red]error:[/red] --device {args.device}: no CUDA device; use --model tiny on a CPU")
        return EXIT_USAGE
    try:
        klein, upscaler = engines or build_engines(args)
    except (UnsupportedQuantization, ValueError, OSError) as exc:  # bad choice, missing weights
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE
    except torch.OutOfMemoryError:
        gc.collect()
        device = torch.device(args.device)
        profile = BenchmarkProfile(
            **_identity(args, device, gpu_section(device)),
            limits=Limits(),
            recommendation=not_fitting(args.model, args.quantization, "out of memory while loading"),
        )
    else:
        profile = run_benchmark(klein, upscaler, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(profile.model_dump_json(indent=2) + "\n")
    logger.info("profile written to %s", args.output)
    print(markdown_table(profile))
    rec = profile.recommendation
    print(f"\nfits={str(rec.fits).lower()} MODEL={rec.model} QUANTIZATION={rec.quantization}")
    return EXIT_FITS if rec.fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
