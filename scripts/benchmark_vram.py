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
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from rich.console import Console
from rich.logging import RichHandler

from handlers.engines.klein import KleinEngine
from handlers.engines.quantize import UnsupportedQuantization
from handlers.engines.upscaler import Upscaler
from worker.boot import default_quantization
from worker.profile import GIB, BenchmarkProfile, Limits, not_fitting, size_key
from worker.vram_benchmark import gpu_section, profile_identity, run_benchmark

logger = logging.getLogger("benchmark_vram")

EXIT_FITS = 0
EXIT_USAGE = 2
EXIT_DOES_NOT_FIT = 3

QUANTIZATIONS = ("auto", "none", "fp8", "int8", "nunchaku-int4", "nunchaku-fp4")


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
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the engine as the worker does on CUDA (adds minutes of compiling; "
        "the latencies are then the served ones, which the fleet's throughput estimate reads)",
    )
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.runs < 1 or args.ref_side < 64 or args.upscale_input < 0:
        parser.error("--steps and --runs must be >= 1, --ref-side >= 64, --upscale-input >= 0")
    if args.quantization == "auto":
        args.quantization = default_quantization(args.model)
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


def build_engines(args: argparse.Namespace) -> tuple[KleinEngine, Upscaler, dict[str, Any]]:
    """Random full-size weights, or the worker's own loading path (MODEL_PATH, HF_TOKEN, ...).

    With ``--compile`` (CUDA only) the engine is warmed through the worker's compile cache
    (COMPILE_CACHE, COMPILE_SIZES from the environment), so this benchmark also seeds the bundle
    the fleet's workers load at boot: random weights compile the very graphs real ones do.
    Returns the boot phases too (compile time, cache state)."""
    from worker.boot import Variant, compile_stores
    from worker.boot import build_engines as worker_build_engines
    from worker.config import Settings

    on_cuda = (args.device or ("cpu" if args.model == "tiny" else "cuda")).startswith("cuda")
    settings = Settings(
        model=args.model,
        quantization=args.quantization,
        device=args.device,
        torch_compile=args.compile and on_cuda,  # inductor's CPU build is for tests, not profiles
    )
    variant = Variant(args.model, args.quantization, args.device, "benchmark")
    if args.random_weights and args.model != "tiny":
        from handlers.engines.random_weights import create_random_klein_engine, create_random_upscaler
        from worker import compile_boot

        engine = create_random_klein_engine(
            model=args.model,
            quantization=args.quantization,
            device=args.device,
            compile=bool(settings.torch_compile),
            compile_sizes=settings.compile_shapes(),
        )
        phases: dict[str, Any] = {}
        if engine.compiled:
            hf_home = Path(settings.hf_home) if settings.hf_home else Path.home() / ".cache" / "huggingface"
            stores = compile_stores(settings, hf_home)
            compile_boot.warm_up(
                engine, variant=variant.label, quantization=args.quantization, stores=stores, phases=phases
            )
        return engine, create_random_upscaler(device=args.device), phases
    engines = worker_build_engines(settings, variant)
    assert engines.klein is not None and engines.upscaler is not None
    return engines.klein, engines.upscaler, engines.boot


def markdown_table(profile: BenchmarkProfile) -> str:
    """The seed-table layout of shared/reference/flux2-klein.md, one column for this run."""
    steps = profile.settings.steps
    rows = [("card", profile.gpu.name if profile.gpu else "CPU")]
    run = profile.settings
    compiled = f"yes, {run.compile_warmup_s:.1f} s of warm-up" if run.compile_warmup_s else "yes"
    rows.append(("torch.compile", compiled if run.compiled else "no (eager)"))
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


def main(
    argv: list[str] | None = None, *, engines: tuple[KleinEngine, Upscaler, dict[str, Any]] | None = None
) -> int:
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
        klein, upscaler, boot = engines or build_engines(args)
    except (UnsupportedQuantization, ValueError, OSError) as exc:  # bad choice, missing weights
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE
    except torch.OutOfMemoryError:
        gc.collect()
        device = torch.device(args.device)
        profile = BenchmarkProfile(
            **profile_identity(args, device, gpu_section(device)),
            limits=Limits(),
            recommendation=not_fitting(args.model, args.quantization, "out of memory while loading"),
        )
    else:
        profile = run_benchmark(klein, upscaler, args, compile_s=boot.get("compile_s"))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(profile.model_dump_json(indent=2) + "\n")
    logger.info("profile written to %s", args.output)
    print(markdown_table(profile))
    rec = profile.recommendation
    print(f"\nfits={str(rec.fits).lower()} MODEL={rec.model} QUANTIZATION={rec.quantization}")
    return EXIT_FITS if rec.fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
