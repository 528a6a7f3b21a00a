"""Speed benchmark of the klein engine on a GPU: plain diffusers versus the project's engine.

    python scripts/bench_gpu.py --model klein-4b                    # BF16
    python scripts/bench_gpu.py --model klein-9b                    # FP8 (the 9B default)
    python scripts/bench_gpu.py --model klein-4b --quantization fp8 --json out.json
    python scripts/bench_gpu.py --upscale-only                      # Real-ESRGAN x4 rows only
    python scripts/bench_gpu.py --smoke                             # same code, tiny model, CPU

Builds the full-size architecture with random weights on the GPU (``measurement/random_weights.py``:
speed and memory depend on shapes and kernels, not weight values), then on that one pipeline
measures (the code is ``measurement/gpu_speed.py``'s):

1. ``plain``: the pipeline as diffusers constructs it (bf16, all 36 text-encoder layers and the
   lm_head, unfused QKV, eager);
2. ``engine``: the same pipeline through ``build_engine`` (text encoder truncated after layer 27,
   fused QKV, the quantization asked for), eager;
3. ``compiled``: that engine after ``compile_pipeline`` (regional transformer blocks + VAE
   decoder); the warm-up time that pays the compilation is reported as ``compile_warmup_s``.

For each: seconds per ``--size`` image at ``--steps`` steps (median of ``--runs`` after
``--warmup`` calls, whole pipeline call with PIL output), images/s over a batch of ``--batch``
(median of ``--batch-runs``), VRAM at rest (allocated after a gc + empty_cache) and peak (max allocated).
Then Real-ESRGAN x4 (random full-size RRDBNet, 64 filters, 23 blocks, fp16) from ``--size`` to
4x, tiled (the worker's 512 tiles) and untiled, eager and compiled as COMPILE_REGIONS=upscaler
serves it (its compile timed apart). Prints JSON, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from klein_facts.compile_regions import DEFAULT_COMPILE_REGIONS, parse_regions
from klein_facts.variants import KLEIN_MODELS, TORCHAO_QUANTIZATIONS, default_quantization
from measurement.gpu_speed import run_speed_benchmark
from measurement.speed_report import markdown, save_partial


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=KLEIN_MODELS, default="klein-4b")
    parser.add_argument(
        "--quantization", choices=("none", *TORCHAO_QUANTIZATIONS), help="default: none 4b, fp8 9b"
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-runs", type=int, default=3, help="median over this many batch calls")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled stage")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend; with --smoke, 'eager' traces the compiled stage on the CPU",
    )
    parser.add_argument(
        "--compile-cache",
        help="COMPILE_CACHE for the compiled stage: its bundle is loaded (or made and saved) as the "
        "worker's boot does; the compile is then reported as one figure, the cache state beside it",
    )
    parser.add_argument(
        "--compile-static",
        action="store_true",
        help="compile static-shape graphs (dynamic=False) instead of the worker's shape-generic ones, "
        "to measure which serves faster and compiles sooner",
    )
    parser.add_argument(
        "--compile-regions",
        type=parse_regions,
        default=DEFAULT_COMPILE_REGIONS,
        help="COMPILE_REGIONS for the compiled stage (klein's: transformer, vae, text_encoder), "
        f"default {','.join(DEFAULT_COMPILE_REGIONS)}",
    )
    parser.add_argument("--skip-plain", action="store_true", help="skip plain diffusers (saves time)")
    parser.add_argument(
        "--attention-backend",
        help="diffusers attention backend for every stage (e.g. _native_cudnn), as ATTENTION_BACKEND",
    )
    parser.add_argument("--stage-runs", type=int, default=5, help="calls timed per stage (median)")
    parser.add_argument("--skip-upscale", action="store_true")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one image of the last engine under torch.profiler: GPU busy vs idle, host syncs, top host "
        "ops (measurement/glue_profile.py; the full table beside --json as *.profile.txt)",
    )
    parser.add_argument(
        "--upscale-only",
        action="store_true",
        help="only the Real-ESRGAN x4 rows (eager and, unless --no-compile, compiled): no klein build",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model on the CPU, seconds: checks the script"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.size, args.steps, args.runs, args.warmup, args.batch = "tiny", 64, 1, 2, 1, 2
        args.batch_runs, args.stage_runs = 1, 1
        # Inductor only pays on CUDA; the eager backend still checks tracing and recompiles.
        args.no_compile = args.no_compile or args.compile_backend != "eager"
    if args.quantization is None:
        args.quantization = default_quantization(args.model)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    report = run_speed_benchmark(args)
    text = json.dumps(report, indent=2)
    print(text)
    print(markdown(report))
    save_partial(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
