"""What compiling the klein engine costs a worker's boot, measured two ways for ``scripts/bench_gpu.py``:
in two parts with no cache (transformer, VAE decoder), or through the worker's own compile-cache step."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from handlers.engines.klein import KleinEngine
from handlers.engines.speed import compile_transformer, compile_vae_decoder
from measurement.speed_report import save_partial

logger = logging.getLogger("bench_gpu")


def compile_in_parts(engine: KleinEngine, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """What the worker's boot pays with no cache, in two parts (transformer, VAE decoder): on the
    first H100 run the total was 170 s for 4B BF16, and FP8 runs were cut off while compiling."""
    backend, dynamic = args.compile_backend, not args.compile_static
    pipeline: Any = engine.pipeline  # diffusers registers its modules at runtime: mypy cannot see them
    for part, compile_part in (
        (
            "transformer",
            lambda: compile_transformer(pipeline.transformer, backend=backend, dynamic=dynamic),
        ),
        ("vae", lambda: compile_vae_decoder(pipeline.vae, backend=backend, dynamic=dynamic)),
    ):
        compile_part()
        started = time.perf_counter()
        engine.warm_up()
        report[f"compile_warmup_{part}_s"] = time.perf_counter() - started
        logger.info("warm-up after compiling the %s: %.1f s", part, report[f"compile_warmup_{part}_s"])
        save_partial(report, args.json)
    report["compile_warmup_s"] = report["compile_warmup_transformer_s"] + report["compile_warmup_vae_s"]


def compile_through_cache(engine: KleinEngine, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """The worker's own boot step (worker/compile_boot.py) on the engine, under the worker's variant
    name, so a bundle seeded by a worker or by benchmark_vram.py is found (and one made here is
    found by them, when the compiled sizes match: ``--batch 1`` compiles 1024x1024:1 only)."""
    from worker import compile_boot
    from worker.boot import Variant
    from worker.compile_store import open_stores

    backend, dynamic = args.compile_backend, not args.compile_static
    pipeline: Any = engine.pipeline
    compile_transformer(pipeline.transformer, backend=backend, dynamic=dynamic)
    compile_vae_decoder(pipeline.vae, backend=backend, dynamic=dynamic)
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
