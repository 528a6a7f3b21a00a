"""What every benchmark feeds the engine: one prompt and deterministic worst-case reference images."""

from __future__ import annotations

import numpy as np
from PIL import Image

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
