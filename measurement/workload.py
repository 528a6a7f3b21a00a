"""What every benchmark feeds the engine: one prompt, deterministic worst-case reference images, and
the generate job the process-level benchmarks queue on the local stack."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from worker.local import LocalStack

PROMPT = "a red fox in a snowy birch forest at dawn, photo, 85mm, shallow depth of field"


def reference_images(count: int, side: int) -> list[Image.Image]:
    """Noisy gradients: worst-case (full 1024x1024 token count) references, deterministic."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    images = []
    for index in range(count):
        base = (ramp[None, :, None] + ramp[:, None, None] * (index % 3)) / (1 + index % 3)
        noise = rng.normal(0, 24, size=(side, side, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB"))
    return images


def queue_generate_job(stack: LocalStack, job_id: str, *, size: int, seed: int) -> None:
    """One single-image generate job of ``PROMPT`` on the local stack's queue, its upload presigned
    into the stack's bucket under ``bench/<job_id>.png``."""
    job = {
        "id": job_id,
        "type": "generate",
        "input": {
            "prompts": [PROMPT],
            "upload_urls": [stack.presign_put(f"bench/{job_id}.png")],
            "width": size,
            "height": size,
            "seed": seed,
        },
    }
    stack.client("sqs").send_message(QueueUrl=stack.queue_url, MessageBody=json.dumps(job))
