"""Real-ESRGAN x4 speed for ``scripts/bench_gpu.py``: from ``--size`` to 4x, tiled with the worker's
tiles and untiled, eager and (unless ``--no-compile``) compiled as COMPILE_REGIONS=upscaler serves it
(random full-size RRDBNet on a GPU, the tiny upscaler with ``--smoke``)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from handlers.engines.compile_cache import compile_counts
from handlers.engines.upscaler import DEFAULT_TILE_SIZE, Upscaler
from measurement.meter import Meter


def measure_upscale(args: argparse.Namespace, device: torch.device, meter: Meter) -> list[dict[str, Any]]:
    """Real-ESRGAN x4 from ``--size`` to 4x, tiled with the worker's tiles and untiled; eager, then
    compiled: its boot's warm-up (the compile) timed, then the same runs under the worker's
    ``eager_on_recompile`` stance, so a size the graph does not cover shows as eager speed and as
    ``graphs_compiled_during_runs``, never as a compile hidden in the timing."""
    backend = None if args.no_compile else args.compile_backend
    if args.smoke:
        from handlers.engines.upscaler_loader import create_upscaler

        def make(tile: int, compiled: bool) -> Upscaler:
            return create_upscaler(
                model="tiny",
                weights_x2=None,
                weights_x4=None,
                device=str(device),
                tile_size=tile,
                tile_overlap=8,
                compile_backend=backend if compiled else None,
            )

        side, tiles = 64, (32, 0)
    else:
        from measurement.random_weights import realesrgan_state_dict

        def make(tile: int, compiled: bool) -> Upscaler:
            # A free-memory reading of 0 keeps the tiles (the worker runs untiled when it fits).
            return Upscaler(
                sources={4: lambda: realesrgan_state_dict(4)},
                device=device,
                tile_size=tile,
                free_memory=lambda: 0,
                compile_backend=backend if compiled else None,
            )

        side, tiles = args.size, (DEFAULT_TILE_SIZE, 0)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    results = []
    for compiled in (False, True) if backend else (False,):
        if compiled:
            # A compiled klein stage before this one left dynamo refusing new compiles (its warm-up's
            # stance); the worker compiles the upscaler before that, so start from the default.
            torch.compiler.set_stance("default")
        for tile in tiles:
            upscaler = make(tile, compiled)
            started = time.perf_counter()
            compile_s = None
            if compiled:
                upscaler.warm_up()  # loads, then compiles on the warm-up image, as the worker's boot
                compile_s = time.perf_counter() - started
            load_s = upscaler.ensure_loaded(4) if not compiled else None
            graphs_before = compile_counts()["dynamo_graphs"]
            stance = torch.compiler.set_stance("eager_on_recompile") if compiled else contextlib.nullcontext()
            with stance:
                times, peak = meter.timed(
                    functools.partial(upscaler.upscale, image, 4), runs=1 if args.smoke else 5, warmup=1
                )
            results.append(
                {
                    "tile": tile or None,
                    "compiled": compiled,
                    "input": side,
                    "output": side * 4,
                    "load_s": load_s,
                    "compile_s": compile_s,
                    "s": statistics.median(times),
                    "peak_gib": peak,
                    "graphs_compiled_during_runs": compile_counts()["dynamo_graphs"] - graphs_before,
                }
            )
            upscaler.release()
    return results
