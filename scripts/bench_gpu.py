"""Speed benchmark of the klein engine on a GPU: plain diffusers versus the project's engine.

    python scripts/bench_gpu.py --model klein-4b                    # BF16
    python scripts/bench_gpu.py --model klein-9b                    # FP8 (the 9B default)
    python scripts/bench_gpu.py --model klein-4b --quantization fp8 --json out.json
    python scripts/bench_gpu.py --smoke                             # same code, tiny model, CPU

Builds the full-size architecture with random weights on the GPU (``random_weights.py``: speed
and memory depend on shapes and kernels, not weight values), then on that one pipeline measures:

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
4x, tiled (the worker's 512 tiles) and untiled. Prints JSON, then a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image

from handlers.engines.klein import KleinEngine
from handlers.engines.klein_loader import build_engine, prompt_settings
from handlers.engines.speed import (
    compile_transformer,
    compile_vae_decoder,
    enable_fast_math,
    set_attention_backend,
)
from handlers.engines.upscaler import DEFAULT_TILE_SIZE, Upscaler
from worker.boot import default_quantization
from worker.stage_timing import time_stages

logger = logging.getLogger("bench_gpu")

PROMPT = "a red fox in a snowy birch forest at dawn, photo, 85mm, shallow depth of field"
# The reference compute floor for klein-4B at 1024x1024, 4 steps, on an H100 (flux2-klein.md).
H100_FLOOR_S = 0.2
GIB = 1 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("klein-4b", "klein-9b"), default="klein-4b")
    parser.add_argument("--quantization", choices=("none", "fp8", "int8"), help="default: none 4b, fp8 9b")
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
    parser.add_argument("--skip-plain", action="store_true", help="skip plain diffusers (saves time)")
    parser.add_argument(
        "--attention-backend",
        help="diffusers attention backend for every stage (e.g. _native_cudnn), as ATTENTION_BACKEND",
    )
    parser.add_argument("--stage-runs", type=int, default=5, help="calls timed per stage (median)")
    parser.add_argument("--skip-upscale", action="store_true")
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


class Meter:
    """Wall time and peak allocation of a block of CUDA work (peaks None on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / GIB if self.cuda else None

    def rest(self) -> dict[str, float | None]:
        gc.collect()
        if not self.cuda:
            return {"allocated_gib": None, "reserved_gib": None}
        torch.cuda.empty_cache()
        return {
            "allocated_gib": torch.cuda.memory_allocated(self.device) / GIB,
            "reserved_gib": torch.cuda.memory_reserved(self.device) / GIB,
        }

    def timed(self, call: Callable[[], Any], *, runs: int, warmup: int) -> tuple[list[float], float | None]:
        for _ in range(warmup):
            call()
        self.sync()
        self.reset_peak()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            call()
            self.sync()
            times.append(time.perf_counter() - started)
        return times, self.peak_gib()


def build_pipeline(args: argparse.Namespace, device: torch.device) -> Any:
    if args.smoke:
        from handlers.engines.tiny import build_tiny_pipeline

        return build_tiny_pipeline().to(device)
    from handlers.engines.random_weights import build_random_pipeline

    return build_random_pipeline(args.model, device=device, dtype=torch.bfloat16)


def measure_plain(pipeline: Any, args: argparse.Namespace, meter: Meter) -> dict[str, Any]:
    """Diffusers as constructed: one ``pipeline(...)`` call per image or batch."""
    layers, max_length = prompt_settings(pipeline)  # the defaults (9, 18, 27), 512 on the real model
    pipeline.set_progress_bar_config(disable=True)

    def call(batch: int) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return pipeline(
                    prompt=[PROMPT] * batch,
                    width=args.size,
                    height=args.size,
                    num_inference_steps=args.steps,
                    guidance_scale=1.0,
                    generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)],
                    output_type="pil",
                    max_sequence_length=max_length,
                    text_encoder_out_layers=layers,
                )

        return run

    return measure_stage("plain", call, args, meter, pipeline)


def measure_engine(stage: str, engine: KleinEngine, args: argparse.Namespace, meter: Meter) -> dict[str, Any]:
    def call(batch: int) -> Callable[[], Any]:
        def run() -> Any:
            return engine.generate(
                prompts=[PROMPT] * batch,
                seeds=list(range(batch)),
                references=[],
                width=args.size,
                height=args.size,
                num_steps=args.steps,
                guidance_scale=1.0,
            )

        return run

    return measure_stage(stage, call, args, meter, engine.pipeline)


def measure_stage(
    stage: str,
    call: Callable[[int], Callable[[], Any]],
    args: argparse.Namespace,
    meter: Meter,
    pipeline: Any,
) -> dict[str, Any]:
    rest = meter.rest()
    graphs_before = _compiled_graphs()
    single, single_peak = meter.timed(call(1), runs=args.runs, warmup=args.warmup)
    # Where one image's time goes (CUDA events around each model): text encoder, the transformer
    # over all steps, VAE decode, and the rest of the call ("post": unpacking, PIL).
    stages = time_stages(pipeline, meter.device, call(1), runs=args.stage_runs)
    batch, batch_peak = meter.timed(call(args.batch), runs=args.batch_runs, warmup=1)
    result = {
        "stage": stage,
        "s_per_image": statistics.median(single),
        "s_per_image_min": min(single),
        "stages_s": stages,
        "batch": args.batch,
        "images_per_s": args.batch / statistics.median(batch),
        "rest": rest,
        "peak_gib_single": single_peak,
        "peak_gib_batch": batch_peak,
        # Graphs dynamo compiled in this stage (its warm-up calls included): 0 when the boot
        # warm-up already covered these shapes, so no job would stall on a recompile.
        "graphs_compiled_during_runs": _compiled_graphs() - graphs_before,
    }
    logger.info("%s: %.3f s/image, %.2f images/s", stage, result["s_per_image"], result["images_per_s"])
    return result


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure_upscale(args: argparse.Namespace, device: torch.device, meter: Meter) -> list[dict[str, Any]]:
    """Real-ESRGAN x4 from ``--size`` to 4x, tiled with the worker's tiles and untiled."""
    if args.smoke:
        from handlers.engines.upscaler import create_upscaler

        def make(tile: int) -> Upscaler:
            return create_upscaler(
                model="tiny",
                weights_x2=None,
                weights_x4=None,
                device=str(device),
                tile_size=tile,
                tile_overlap=8,
            )

        side, tiles = 64, (32, 0)
    else:
        from handlers.engines.random_weights import realesrgan_state_dict

        def make(tile: int) -> Upscaler:
            # A free-memory reading of 0 keeps the tiles (the worker runs untiled when it fits).
            return Upscaler(
                sources={4: lambda: realesrgan_state_dict(4)},
                device=device,
                tile_size=tile,
                free_memory=lambda: 0,
            )

        side, tiles = args.size, (DEFAULT_TILE_SIZE, 0)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    results = []
    for tile in tiles:
        upscaler = make(tile)
        load_s = upscaler.ensure_loaded(4)
        times, peak = meter.timed(
            lambda u=upscaler: u.upscale(image, 4), runs=1 if args.smoke else 5, warmup=1
        )
        results.append(
            {
                "tile": tile or None,
                "input": side,
                "output": side * 4,
                "load_s": load_s,
                "s": statistics.median(times),
                "peak_gib": peak,
            }
        )
        upscaler.release()
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    meter = Meter(device)
    report: dict[str, Any] = {"env": environment(device), "args": _jsonable(vars(args)), "stages": []}

    started = time.perf_counter()
    pipeline = build_pipeline(args, device)
    report["build_s"] = time.perf_counter() - started
    # The same backend flags for every stage, plain diffusers included: TF32/cuDNN autotuning as
    # the engine sets them, and the attention backend asked for.
    if device.type == "cuda":
        enable_fast_math()
    if args.attention_backend:
        set_attention_backend(pipeline.transformer, args.attention_backend)
    if not args.skip_plain:
        report["stages"].append(measure_plain(pipeline, args, meter))
        save_partial(report, args)

    started = time.perf_counter()
    engine = build_engine(
        pipeline,
        name=f"bench-{args.model}",
        device=device,
        quantization=args.quantization,
        compile=False,
        attention_backend=args.attention_backend,
    )
    report["engine_build_s"] = time.perf_counter() - started
    report["stages"].append(measure_engine(f"engine {args.quantization}", engine, args, meter))
    save_partial(report, args)

    if not args.no_compile:
        # What the worker's boot pays (compile_pipeline + warm_up), in two parts: on the first H100
        # run the total was 170 s for 4B BF16, and FP8 runs were cut off while still compiling.
        engine.compiled = True
        # Both measured shapes compiled, as a worker with COMPILE_SIZES=SIZExSIZE,SIZExSIZE:BATCH.
        engine.compile_sizes = ((1, args.size, args.size),)
        if args.batch > 1:
            engine.compile_sizes += ((args.batch, args.size, args.size),)
        if args.compile_cache:
            compile_through_cache(engine, args, report)
        else:
            compile_in_parts(engine, args, report)
        save_partial(report, args)
        report["stages"].append(measure_engine(f"compiled {args.quantization}", engine, args, meter))
        save_partial(report, args)

    if not args.skip_upscale:
        report["upscale_x4"] = measure_upscale(args, device, meter)
    return report


def compile_in_parts(engine: KleinEngine, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """What the worker's boot pays with no cache, in two parts (transformer, VAE decoder): on the
    first H100 run the total was 170 s for 4B BF16, and FP8 runs were cut off while compiling."""
    backend, dynamic = args.compile_backend, not args.compile_static
    for part, compile_part in (
        (
            "transformer",
            lambda: compile_transformer(engine.pipeline.transformer, backend=backend, dynamic=dynamic),
        ),
        ("vae", lambda: compile_vae_decoder(engine.pipeline.vae, backend=backend, dynamic=dynamic)),
    ):
        compile_part()
        started = time.perf_counter()
        engine.warm_up()
        report[f"compile_warmup_{part}_s"] = time.perf_counter() - started
        logger.info("warm-up after compiling the %s: %.1f s", part, report[f"compile_warmup_{part}_s"])
        save_partial(report, args)
    report["compile_warmup_s"] = report["compile_warmup_transformer_s"] + report["compile_warmup_vae_s"]


def compile_through_cache(engine: KleinEngine, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """The worker's own boot step (worker/compile_boot.py) on the engine, under the worker's variant
    name, so a bundle seeded by a worker or by benchmark_vram.py is found (and one made here is
    found by them, when the compiled sizes match: ``--batch 1`` compiles 1024x1024:1 only)."""
    from worker import compile_boot
    from worker.boot import Variant
    from worker.compile_store import open_stores

    backend, dynamic = args.compile_backend, not args.compile_static
    compile_transformer(engine.pipeline.transformer, backend=backend, dynamic=dynamic)
    compile_vae_decoder(engine.pipeline.vae, backend=backend, dynamic=dynamic)
    variant = Variant(args.model, args.quantization, engine.device.type, "bench")

    def s3_client() -> Any:
        import boto3

        return boto3.client("s3")

    stores = open_stores(args.compile_cache, default_folder=Path(args.compile_cache), s3_client=s3_client)
    compile_boot.use_inductor_cache_dir(stores)  # the worker's own layout: its C++/Triton builds too
    phases: dict[str, Any] = {}
    compile_boot.warm_up(
        engine,
        variant=variant.label,
        quantization=args.quantization,
        stores=stores,
        phases=phases,
        dynamic=dynamic,
    )
    report["compile_boot"] = phases
    report["compile_warmup_s"] = phases["compile_s"] + phases["warm_up_s"]


def save_partial(report: dict[str, Any], args: argparse.Namespace) -> None:
    """Write what is measured so far: a run cut off by a time limit still leaves its stages."""
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "device": str(device)}
    for package in ("torch", "diffusers", "transformers", "torchao", "spandrel"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def markdown(report: dict[str, Any]) -> str:
    args = report["args"]
    lines = [
        f"{args['model']} on {report['env'].get('gpu', report['env']['device'])}, "
        f"{args['size']}x{args['size']}, {args['steps']} steps (random weights)",
        "",
        f"| stage | s/image (median of {args['runs']}) | images/s (batch {args['batch']}) "
        "| VRAM at rest (GiB) | peak single / batch (GiB) |",
        "|---|---|---|---|---|",
    ]
    for stage in report["stages"]:
        lines.append(
            f"| {stage['stage']} | {stage['s_per_image']:.3f} | {stage['images_per_s']:.2f} "
            f"| {_gib(stage['rest']['allocated_gib'])} "
            f"| {_gib(stage['peak_gib_single'])} / {_gib(stage['peak_gib_batch'])} |"
        )
    lines += [
        "",
        "| stage | text encoder | denoise | VAE decode | post | total (s, median) |",
        "|---|---|---|---|---|---|",
    ]
    for stage in report["stages"]:
        parts = stage["stages_s"]
        lines.append(
            f"| {stage['stage']} | {parts['text_encoder']:.3f} | {parts['denoise']:.3f} "
            f"| {parts['vae_decode']:.3f} | {parts['post']:.3f} | {parts['total']:.3f} |"
        )
    if "compile_boot" in report:
        boot = report["compile_boot"]
        lines.append(
            f"\nBoot cost of compiling: {report['compile_warmup_s']:.1f} s "
            f"(compile cache {boot['compile_cache']}: {boot.get('graphs_compiled')} graphs compiled, "
            f"{boot.get('graphs_from_cache')} from the cache)"
        )
    elif "compile_warmup_s" in report:
        lines.append(
            f"\nBoot cost of compiling (warm-up of the compiled engine): {report['compile_warmup_s']:.1f} s"
            f" (transformer {report['compile_warmup_transformer_s']:.1f} s,"
            f" VAE decoder {report['compile_warmup_vae_s']:.1f} s)"
        )
    if args["model"] == "klein-4b" and report["stages"]:
        best = min(stage["s_per_image"] for stage in report["stages"])
        lines.append(f"Best vs the H100 floor ({H100_FLOOR_S} s): {best / H100_FLOOR_S:.2f}x")
    if report.get("upscale_x4"):
        lines += ["", "| Real-ESRGAN x4 | load (s) | upscale (s) | peak (GiB) |", "|---|---|---|---|"]
        for row in report["upscale_x4"]:
            label = f"{row['input']}->{row['output']} " + (
                f"tiled {row['tile']}" if row["tile"] else "untiled"
            )
            lines.append(f"| {label} | {row['load_s']:.2f} | {row['s']:.3f} | {_gib(row['peak_gib'])} |")
    return "\n".join(lines)


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    print(markdown(report))
    save_partial(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
