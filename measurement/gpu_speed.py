"""The speed benchmark behind ``scripts/bench_gpu.py``: on one full-size random-weight pipeline, plain
diffusers, then the project's engine eager, then compiled; per stage the seconds per image (with the
per-model split), images/s over a batch, VRAM at rest and peak; then the upscaler."""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from handlers.engines.klein import KleinEngine
from handlers.engines.klein_loader import build_engine, prompt_settings
from handlers.engines.speed import enable_fast_math, set_attention_backend
from measurement.compile_cost import compile_in_parts, compile_through_cache
from measurement.engines import build_pipeline
from measurement.environment import environment
from measurement.glue_profile import profile_call
from measurement.meter import Meter
from measurement.speed_report import save_partial
from measurement.stage_timing import time_stages
from measurement.upscale_speed import measure_upscale
from measurement.workload import PROMPT

logger = logging.getLogger("bench_gpu")


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
    rest = meter.rest_gib()
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
    from handlers.engines.compile_cache import compile_counts

    return compile_counts()["dynamo_graphs"]


def run_speed_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage the arguments ask for; the report is saved (``--json``) after each one."""
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    meter = Meter(device)
    report: dict[str, Any] = {"env": environment(device), "args": _jsonable(vars(args)), "stages": []}
    if args.upscale_only:
        report["upscale_x4"] = measure_upscale(args, device, meter)
        return report

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
        save_partial(report, args.json)

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
    save_partial(report, args.json)

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
        save_partial(report, args.json)
        report["stages"].append(measure_engine(f"compiled {args.quantization}", engine, args, meter))
        save_partial(report, args.json)

    if args.profile:
        # One image of the last engine measured (the compiled one unless --no-compile).
        table = args.json.with_suffix(".profile.txt") if args.json else None
        one_image = functools.partial(
            engine.generate,
            prompts=[PROMPT],
            seeds=[0],
            references=[],
            width=args.size,
            height=args.size,
            num_steps=args.steps,
            guidance_scale=1.0,
        )
        report["profile"] = profile_call(one_image, device, table)
        save_partial(report, args.json)

    if not args.skip_upscale:
        report["upscale_x4"] = measure_upscale(args, device, meter)
    return report


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}
