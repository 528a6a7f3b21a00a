"""The engines and pipelines a benchmark measures: full-size random weights (no download) or the
worker's own loading path, and the tiny pipeline of the CPU smoke runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from handlers.engines.klein import KleinEngine
from handlers.engines.upscaler import Upscaler
from klein_facts.compile_regions import klein_regions


def build_vram_engines(args: argparse.Namespace) -> tuple[KleinEngine, Upscaler, dict[str, Any]]:
    """Random full-size weights, or the worker's own loading path (MODEL_PATH, HF_TOKEN, ...).

    With ``--compile`` (CUDA only) the engine is warmed through the worker's compile cache
    (COMPILE_CACHE, COMPILE_SIZES, COMPILE_REGIONS from the environment), so this benchmark also
    seeds the bundle the fleet's workers load at boot: random weights compile the very graphs real
    ones do.
    Returns the boot phases too (compile time, cache state)."""
    from worker.boot import build_engines as worker_build_engines
    from worker.boot import compile_stores
    from worker.config import Settings
    from worker.variant import Variant

    on_cuda = (args.device or ("cpu" if args.model == "tiny" else "cuda")).startswith("cuda")
    settings = Settings(
        model=args.model,
        quantization=args.quantization,
        device=args.device,
        torch_compile=args.compile and on_cuda,  # inductor's CPU build is for tests, not profiles
    )
    variant = Variant(args.model, args.quantization, args.device, "benchmark")
    if args.random_weights and args.model != "tiny":
        from measurement.random_weights import create_random_klein_engine, create_random_upscaler
        from worker import compile_boot

        regions = settings.regions_to_compile("cuda" if on_cuda else "cpu")
        engine = create_random_klein_engine(
            model=args.model,
            quantization=args.quantization,
            device=args.device,
            compile=bool(klein_regions(regions)),
            compile_sizes=settings.compile_shapes(),
            compile_regions=klein_regions(regions),
        )
        # As the worker's boot: a compiled upscaler warms up in the same window and bundle.
        upscaler = create_random_upscaler(
            device=args.device, compile_backend="inductor" if "upscaler" in regions else None
        )
        phases: dict[str, Any] = {}
        if regions:
            hf_home = Path(settings.hf_home) if settings.hf_home else Path.home() / ".cache" / "huggingface"
            stores = compile_stores(settings, hf_home)
            compile_boot.warm_up(
                engine,
                variant=variant.label,
                quantization=args.quantization,
                stores=stores,
                phases=phases,
                upscaler=upscaler,
                precompile=settings.torch_caching_precompile,  # the worker's bundle, with or without
            )
        return engine, upscaler, phases
    engines = worker_build_engines(settings, variant)
    assert engines.klein is not None and engines.upscaler is not None
    return engines.klein, engines.upscaler, engines.boot


def build_pipeline(args: argparse.Namespace, device: torch.device) -> Any:
    """The diffusers pipeline the speed benchmarks wrap: full-size random bf16, or tiny (``--smoke``)."""
    if args.smoke:
        from handlers.engines.tiny import build_tiny_pipeline

        pipeline: Any = build_tiny_pipeline()
        return pipeline.to(device)
    from measurement.random_weights import build_random_pipeline

    return build_random_pipeline(args.model, device=device, dtype=torch.bfloat16)
