"""What compiling the klein engine costs a worker's boot, measured two ways for ``scripts/bench_gpu.py``:
region by region with no cache (``--compile-regions``: transformer, VAE decoder, text encoder), or
through the worker's own compile-cache step."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch

from handlers.engines.compile_cache import compile_counts
from handlers.engines.klein import KleinEngine
from klein_facts.compile_regions import klein_regions
from measurement.speed_report import save_partial

logger = logging.getLogger("bench_gpu")


def compile_regions(engine: KleinEngine, args: argparse.Namespace, regions: tuple[str, ...]) -> None:
    """Wrap ``regions`` for compiling as the worker does (``--compile-static``: static shapes for
    the transformer and the VAE), and count them among the engine's compiled regions."""
    engine.compile_at_first_run(regions, backend=args.compile_backend, dynamic=not args.compile_static)


def compile_in_parts(engine: KleinEngine, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """What the worker's boot pays with no cache, region by region (``--compile-regions``; on the
    first H100 run transformer + VAE decoder took 170 s for 4B BF16, and FP8 runs were cut off
    while compiling): each region's compile is the warm-up that follows its wrapping."""
    engine.compile_regions = ()
    parts = klein_regions(args.compile_regions)
    for part in parts:
        compile_regions(engine, args, (part,))
        # The previous part's warm-up ended with dynamo refusing new compiles (the worker's stance);
        # under that stance no new function compiles (torch 2.14), so this one would otherwise run eager.
        torch.compiler.set_stance("default")
        graphs = compile_counts()["dynamo_graphs"]
        started = time.perf_counter()
        engine.warm_up()
        report[f"compile_warmup_{part}_s"] = time.perf_counter() - started
        # 0 would mean the region ran eager: its compile was refused or never reached.
        report[f"compile_graphs_{part}"] = compile_counts()["dynamo_graphs"] - graphs
        logger.info("warm-up after compiling the %s: %.1f s", part, report[f"compile_warmup_{part}_s"])
        save_partial(report, args.json)
    report["compile_warmup_s"] = sum(report[f"compile_warmup_{part}_s"] for part in parts)


def compile_through_cache(engine: KleinEngine, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """The worker's own boot step (worker/compile_boot.py) on the engine, under the worker's variant
    name, so a bundle seeded by a worker or by benchmark_vram.py is found (and one made here is
    found by them, when the compiled sizes match: ``--batch 1`` compiles 1024x1024:1 only)."""
    from worker import compile_boot
    from worker.compile_store import open_stores
    from worker.variant import Variant

    dynamic = not args.compile_static
    engine.compile_regions = ()
    compile_regions(engine, args, klein_regions(args.compile_regions))
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
