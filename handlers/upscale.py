"""The ``upscale`` handler: download, Real-ESRGAN x2/x4, encode, upload."""

from __future__ import annotations

import time

from PIL import Image

from handlers.dispatch import Engines, is_oom, oom_error
from handlers.errors import InvalidInput
from handlers.imaging import encode_image
from handlers.ports import Transfer
from handlers.schemas import UpscaleInput, UpscaleOutput


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


def upscale(inp: UpscaleInput, *, engines: Engines, transfer: Transfer) -> UpscaleOutput:
    started = time.perf_counter()
    if engines.upscaler is None:
        raise InvalidInput("type: this worker has no upscaler configured")

    # 1. Input image.
    t0 = time.perf_counter()
    image = transfer.download_image(inp.image_url, field="image_url")
    download_ms = elapsed_ms(t0)

    # 2. Model (loaded on demand) and 3. inference.
    result, load_s, upscale_ms = upscale_image(engines, image, inp.scale, release=True)

    # 4. Encode and upload.
    data, content_type = encode_image(result, inp.output_format, inp.quality)
    t0 = time.perf_counter()
    url = transfer.upload(inp.upload_url, data, content_type, field="upload_url")
    return UpscaleOutput(
        output_url=url,
        input_width=image.width,
        input_height=image.height,
        output_width=result.width,
        output_height=result.height,
        scale=inp.scale,
        timing_download_ms=download_ms,
        timing_load_ms=int(load_s * 1000),
        timing_upscale_ms=upscale_ms,
        timing_upload_ms=elapsed_ms(t0),
        timing_total_ms=elapsed_ms(started),
    )
