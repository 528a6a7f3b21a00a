"""Real-ESRGAN x4 speed for ``scripts/bench_gpu.py``: from ``--size`` to 4x, tiled with the worker's
tiles and untiled (random full-size RRDBNet on a GPU, the tiny upscaler with ``--smoke``)."""

from __future__ import annotations

import argparse
import functools
import statistics
from typing import Any

import numpy as np
import torch
from PIL import Image

from handlers.engines.upscaler import DEFAULT_TILE_SIZE, Upscaler
from measurement.meter import Meter


def measure_upscale(args: argparse.Namespace, device: torch.device, meter: Meter) -> list[dict[str, Any]]:
    """Real-ESRGAN x4 from ``--size`` to 4x, tiled with the worker's tiles and untiled."""
    if args.smoke:
        from handlers.engines.upscaler_loader import create_upscaler

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
        from measurement.random_weights import realesrgan_state_dict

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
            functools.partial(upscaler.upscale, image, 4), runs=1 if args.smoke else 5, warmup=1
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
