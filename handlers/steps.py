"""Steps both handlers take: timing a stage, upscaling under the GPU lock, summing the timings."""

from __future__ import annotations

import time
from collections.abc import Iterable

from PIL import Image
from pydantic import BaseModel

from handlers.engine_set import Engines
from handlers.errors import InvalidInput
from handlers.oom import is_oom, oom_error


def elapsed_ms(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)


def upscale_image(
    engines: Engines, image: Image.Image, scale: int, *, release: bool
) -> tuple[Image.Image, float, int]:
    """Real-ESRGAN under the GPU lock; an OOM becomes ``out_of_memory``.

    Returns (image, load seconds, upscale ms). ``release`` lets the upscaler drop its weights
    afterwards unless VRAM allows keeping them (a batch releases once, after its last image).
    """
    if engines.upscaler is None:
        raise InvalidInput("upscale: this worker has no upscaler configured")
    try:
        with engines.gpu:
            load_s = engines.upscaler.ensure_loaded(scale)
            started = time.perf_counter()
            result = engines.upscaler.upscale(image, scale)
            upscale_ms = elapsed_ms(started)
            if release:
                engines.upscaler.after_job()
    except Exception as exc:
        if is_oom(exc):
            raise oom_error(engines, f"upscaling {image.width}x{image.height} x{scale}") from exc
        raise
    return result, load_s, upscale_ms


def stage_timings(rows: Iterable[BaseModel], *, total_ms: int) -> dict[str, int]:
    """The ``timing_*`` figures of ``rows`` (a batch's images: summed), then the job's total: what the
    job's log line and the stage metrics show."""
    totals: dict[str, int] = {}
    for row in rows:
        for key, value in row.model_dump().items():
            if key.startswith("timing_") and isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
    totals["timing_total_ms"] = total_ms
    return totals
