"""Tiled inference for image-to-image networks, with seams blended away.

Written here rather than taken from a library: spandrel loads the models but runs them whole,
and Real-ESRGAN's own tiling (in the ``realesrgan`` package, broken on current torchvision)
pastes each tile's centre without blending. This one cross-fades the overlap, so no seam shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def run_tiled(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    scale: int,
    tile_size: int,
    overlap: int,
    align: int = 1,
) -> torch.Tensor:
    """Apply ``model`` to (1, C, H, W) ``image`` tile by tile, blending the seams.

    The image is cut into cores of at most ``tile_size`` pixels; each tile is its core plus
    ``overlap`` pixels of context on every inner side (Real-ESRGAN's tile_pad). Across the
    2 x ``overlap`` band that neighbours share, their outputs cross-fade linearly, so a tile's
    poorly-contexted border counts least and no seam shows. Cuts fall on multiples of ``align``
    so pixel-unshuffle models see the same pixel grid as untiled. A ``tile_size`` of 0, or an
    image no bigger than one tile, runs in one piece.
    """
    _, _, height, width = image.shape
    if tile_size <= 0 or (height <= tile_size and width <= tile_size):
        return model(image)
    output: torch.Tensor | None = None
    weight = image.new_zeros((1, 1, height * scale, width * scale))
    for top, bottom in _spans(height, tile_size, overlap, align):
        for left, right in _spans(width, tile_size, overlap, align):
            piece = model(image[:, :, top:bottom, left:right])
            if output is None:
                output = image.new_zeros((1, piece.shape[1], height * scale, width * scale))
            ramp_y = _ramp(bottom - top, 2 * overlap * scale, scale, top > 0, bottom < height, image)
            ramp_x = _ramp(right - left, 2 * overlap * scale, scale, left > 0, right < width, image)
            mask = ramp_y[:, None] * ramp_x[None, :]
            rows = slice(top * scale, bottom * scale)
            cols = slice(left * scale, right * scale)
            output[:, :, rows, cols] += piece * mask
            weight[:, :, rows, cols] += mask
    assert output is not None
    return output / weight


def _spans(length: int, tile: int, overlap: int, align: int) -> list[tuple[int, int]]:
    """(start, end) of the tiles along one axis: even cores of at most ``tile``, plus context."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil(length / tile)
    cuts = [round(i * length / count) // align * align for i in range(count)] + [length]
    pad = math.ceil(overlap / align) * align  # keeps tile origins on the grid too
    return [(max(0, cuts[i] - pad), min(length, cuts[i + 1] + pad)) for i in range(count)]


def _ramp(size: int, band: int, scale: int, lead: bool, trail: bool, like: torch.Tensor) -> torch.Tensor:
    """Per-output-pixel weights along one axis of a tile: rising across ``band`` at inner edges."""
    ramp = like.new_ones(size * scale, dtype=torch.float32)
    band = min(band, size * scale // 2)
    if band > 0:
        # Strictly positive, so a pixel covered by one tile only still gets a weight.
        rising = (torch.arange(band, device=like.device, dtype=torch.float32) + 0.5) / band
        if lead:
            ramp[:band] = torch.minimum(ramp[:band], rising)
        if trail:
            ramp[-band:] = torch.minimum(ramp[-band:], rising.flip(0))
    return ramp.to(like.dtype)
