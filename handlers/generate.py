"""The ``generate`` handler: a batch of prompts, shared references, optional upscale, one upload each.

Reads top to bottom like a diffusers ``__call__``: 1. seeds, 2. references, 3. LoRA adapter
files, 4. inference (with the job's adapters on), 5. per-image upscale/encode/upload, 6. output.
Transient failures raise (the whole job is retried, seeds make it reproduce the same images); a
permanent failure of one image's upload is reported on that item and the others still succeed
(``partial``).
"""

from __future__ import annotations

import logging
import secrets
import time
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from PIL import Image

from handlers.engine_set import Engines
from handlers.errors import InvalidInput, JobError
from handlers.imaging import encode_image
from handlers.lora_files import AdapterFile
from handlers.oom import is_oom, oom_error
from handlers.ports import Finished, Transfer
from handlers.schemas import GeneratedImage, GenerateInput, GenerateOutput
from handlers.steps import elapsed_ms, stage_timings, upscale_image

if TYPE_CHECKING:
    from handlers.engines.klein import KleinEngine

log = logging.getLogger(__name__)


def generate(inp: GenerateInput, *, engines: Engines, transfer: Transfer) -> Finished:
    started = time.perf_counter()
    if not engines.can_generate:
        raise JobError("this worker has no generation model", code="internal", retryable=True)

    # 1. Seeds: random when absent, always reported; image i uses seed + i.
    base_seed = inp.seed if inp.seed is not None else secrets.randbelow(2**32)
    seeds = [base_seed + i for i in range(len(inp.prompts))]

    # 2. Reference images, shared by every prompt of the batch.
    references = [
        transfer.download_image(ref.url, field=f"images[{i}].url") for i, ref in enumerate(inp.images)
    ]

    # 3. LoRA adapter files: fetched through the guarded path, kept on disk by content hash.
    adapter_files = _fetch_adapters(inp, engines=engines, transfer=transfer)

    # 4. Inference: one batched call, the job's adapters on for it and off after it.
    t0 = time.perf_counter()
    try:
        with engines.gpu:
            engine = engines.generation_engine()
            with _adapters_applied(engine, adapter_files):
                images = engine.generate(
                    prompts=list(inp.prompts),
                    seeds=seeds,
                    references=references,
                    width=inp.width,
                    height=inp.height,
                    num_steps=inp.num_steps,
                    guidance_scale=inp.guidance_scale,
                )
    except Exception as exc:
        if is_oom(exc):
            raise oom_error(
                engines,
                f"generating {len(inp.prompts)} image(s) of {inp.width}x{inp.height} "
                f"with {len(references)} reference(s)",
            ) from exc
        raise
    inference_ms = elapsed_ms(t0) // max(1, len(images))  # each image's share of the batched call

    # 5. Per image: upscale, encode, upload.
    results = [
        _finish_one(i, image, seeds[i], inference_ms, inp, engines=engines, transfer=transfer)
        for i, image in enumerate(images)
    ]
    if inp.upscale and engines.upscaler is not None:
        with engines.gpu:
            engines.upscaler.after_job()  # release the weights unless VRAM allows keeping them

    # 6. Output; a batch where nothing landed is a failed job, not a partial one.
    if not any(r.success for r in results):
        first = results[0].error or {"code": "internal", "message": "no image produced"}
        raise JobError(first["message"], code=first["code"], retryable=False)  # type: ignore[arg-type]
    output = GenerateOutput(results=results, timing_total_ms=elapsed_ms(started))
    return Finished(
        output,
        status="succeeded" if all(r.success for r in results) else "partial",
        timings=stage_timings(results, total_ms=output.timing_total_ms),
    )


def _fetch_adapters(inp: GenerateInput, *, engines: Engines, transfer: Transfer) -> list[AdapterFile]:
    if not inp.loras:
        return []
    if engines.lora_files is None:
        raise InvalidInput("input.loras: this worker takes no LoRA adapters (MAX_LORAS=0)")
    return engines.lora_files.fetch(inp.loras, transfer=transfer)


def _adapters_applied(engine: KleinEngine, files: list[AdapterFile]) -> AbstractContextManager[None]:
    if not files:
        return nullcontext()
    if engine.loras is None:
        raise InvalidInput("input.loras: this worker takes no LoRA adapters (MAX_LORAS=0)")
    return engine.loras.applied(files)


def _finish_one(
    index: int,
    image: Image.Image,
    seed: int,
    inference_ms: int,
    inp: GenerateInput,
    *,
    engines: Engines,
    transfer: Transfer,
) -> GeneratedImage:
    upscale_ms = None
    if inp.upscale:
        image, _, upscale_ms = upscale_image(engines, image, inp.upscale, release=False)

    data, content_type = encode_image(image, inp.output_format, inp.quality)
    t0 = time.perf_counter()
    try:
        url = transfer.upload(inp.upload_urls[index], data, content_type, field=f"upload_urls[{index}]")
    except JobError as exc:
        if exc.retryable:
            raise  # transient: retry the whole job rather than report a half-finished batch
        log.warning("image %d of the batch not stored: %s", index, exc.message)
        return GeneratedImage(index=index, success=False, seed=seed, error=exc.to_dict())
    return GeneratedImage(
        index=index,
        success=True,
        output_url=url,
        width=image.width,
        height=image.height,
        seed=seed,
        timing_inference_ms=inference_ms,
        timing_upscale_ms=upscale_ms,
        timing_upload_ms=elapsed_ms(t0),
    )
