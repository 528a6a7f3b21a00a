"""The ``upscale`` handler: download, Real-ESRGAN x2/x4, encode, upload."""

from __future__ import annotations

import time

from handlers.engine_set import Engines
from handlers.errors import InvalidInput
from handlers.imaging import encode_image
from handlers.ports import Finished, Transfer
from handlers.schemas import UpscaleInput, UpscaleOutput
from handlers.steps import elapsed_ms, stage_timings, upscale_image


def upscale(inp: UpscaleInput, *, engines: Engines, transfer: Transfer) -> Finished:
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
    output = UpscaleOutput(
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
    return Finished(output, timings=stage_timings([output], total_ms=output.timing_total_ms))
