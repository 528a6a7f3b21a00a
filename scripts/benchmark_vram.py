"""Pre-deploy VRAM and latency benchmark of one klein variant on this card; writes a profile.

    python scripts/benchmark_vram.py --model klein-4b --quantization none --random-weights \\
        --output profile.json

Measures VRAM at rest; per output size the median latency and peak VRAM (torch's peak allocation
and NVML's used memory, sampled after each run while the allocator still holds the run's blocks);
a reference-count series and a batch-size series at the target size (1024x1024, else the largest
size asked), each ended by the first out-of-memory, which is recorded; the upscaler's peak at
x2/x4 with klein resident. Writes the JSON profile (``klein_facts/profile.py``) that the worker
reads as ``BENCHMARK_PROFILE``, then prints a markdown table. The measuring is ``measurement/``'s.

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

import torch
from rich.console import Console
from rich.logging import RichHandler

from handlers.engines.klein import KleinEngine
from handlers.engines.quantize import UnsupportedQuantization
from handlers.engines.upscaler import Upscaler
from klein_facts.variants import MODELS, QUANTIZATION_SETTINGS, default_quantization
from measurement.engines import build_vram_engines as build_engines
from measurement.vram_benchmark import load_failure_profile, run_benchmark
from measurement.vram_report import markdown_table
from worker.config import Settings

logger = logging.getLogger("benchmark_vram")

EXIT_FITS = 0
EXIT_USAGE = 2
EXIT_DOES_NOT_FIT = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument(
        "--quantization", default="auto", choices=QUANTIZATION_SETTINGS, help="auto: fp8 for 9b"
    )
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
        profile = load_failure_profile(args, visible_devices=_visible_devices(args))
    else:
        profile = run_benchmark(
            klein, upscaler, args, compile_s=boot.get("compile_s"), visible_devices=_visible_devices(args)
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(profile.model_dump_json(indent=2) + "\n")
    logger.info("profile written to %s", args.output)
    print(markdown_table(profile))
    rec = profile.recommendation
    print(f"\nfits={str(rec.fits).lower()} MODEL={rec.model} QUANTIZATION={rec.quantization}")
    return EXIT_FITS if rec.fits else EXIT_DOES_NOT_FIT


def _visible_devices(args: argparse.Namespace) -> str | None:
    """CUDA_VISIBLE_DEVICES as the worker reads it: which NVML card torch's device index means."""
    return Settings().cuda_visible_devices if args.device.startswith("cuda") else None


if __name__ == "__main__":
    sys.exit(main())
