"""Making the upscaler: Real-ESRGAN checkpoints by path or URL, or MODEL=tiny's random network.

``create_upscaler`` builds an ``Upscaler`` (handlers/engines/upscaler.py) that loads nothing yet;
the sources it gets are called on first use, so a worker that never upscales never reads them.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from spandrel import ModelLoader
from spandrel.architectures.ESRGAN import ESRGAN

from handlers.engines.upscaler import (
    DEFAULT_KEEP_FREE_BYTES,
    DEFAULT_TILE_OVERLAP,
    DEFAULT_TILE_SIZE,
    SCALES,
    StateDictSource,
    Upscaler,
)
from handlers.engines.weights import is_url, resolve_weights

# Tiny random network: the Real-ESRGAN layout (RRDB trunk, x2 via pixel-unshuffle + x4 body)
# at a width that upscales a 256x256 image on a CPU in about a second.
TINY_NUM_FILTERS = 8
TINY_NUM_BLOCKS = 1
TINY_OUTPUT_GAIN = 10.0


def random_realesrgan(scale: int, *, num_filters: int, num_blocks: int, seed: int = 0) -> ESRGAN:
    """A random-weight network with Real-ESRGAN's layout: x4plus, or x2plus (pixel-unshuffle + x4 body)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale}")
    shuffle = 2 if scale == 2 else None
    torch.manual_seed(seed + scale)
    return ESRGAN(
        in_nc=3 * (shuffle or 1) ** 2,
        out_nc=3,
        num_filters=num_filters,
        num_blocks=num_blocks,
        scale=4,
        shuffle_factor=shuffle,
    )


def tiny_state_dict(scale: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small random Real-ESRGAN-layout state dict for MODEL=tiny."""
    network = random_realesrgan(scale, num_filters=TINY_NUM_FILTERS, num_blocks=TINY_NUM_BLOCKS, seed=seed)
    # Default init gives a near-black output with a third of it clipped at 0; centring the last
    # conv on mid-grey with a larger gain gives textured images that exercise blending and clamping.
    last = network.model[-1]
    with torch.no_grad():
        last.weight.mul_(TINY_OUTPUT_GAIN)
        last.bias.fill_(0.5)
    return network.state_dict()


class WeightsFile:
    """A checkpoint by path or URL, loaded on demand. A URL is downloaded (once, into
    ``cache_dir``) at ``fetch`` (boot, with PRELOAD_MODELS) or on first use, never for a job
    that does not upscale. ``setting`` names the configuration that chose it, for error messages."""

    def __init__(self, source: str, *, cache_dir: str | Path, setting: str) -> None:
        if not is_url(source) and not Path(source).is_file():
            raise FileNotFoundError(f"{setting}: weights file not found: {source}")
        self.source = source
        self.cache_dir = cache_dir
        self.setting = setting

    def fetch(self) -> Path:
        return resolve_weights(self.source, cache_dir=self.cache_dir, setting=self.setting)

    def __call__(self) -> dict[str, torch.Tensor]:
        return ModelLoader().load_state_dict_from_file(self.fetch())


def create_upscaler(
    *,
    model: str,
    weights_x2: str | None,
    weights_x4: str | None,
    device: str | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
    cache_dir: str | Path | None = None,
    keep_free_bytes: int = DEFAULT_KEEP_FREE_BYTES,
    compile_backend: str | Callable[..., Any] | None = None,
) -> Upscaler:
    """Build the upscaler (nothing is loaded yet).

    ``model`` is the worker's MODEL: "tiny" uses random weights; anything else uses the checkpoint
    paths or URLs ``weights_x2``/``weights_x4`` (a scale without weights is simply unavailable).
    URLs are cached in ``cache_dir`` (the worker passes ``$HF_HOME/klein-worker/upscalers``).
    """
    if cache_dir is None:
        cache_dir = Path(tempfile.gettempdir()) / "klein-worker-upscalers"
    sources: dict[int, StateDictSource] = {}
    if model == "tiny":
        # Like the tiny klein engine: CPU unless a device is asked for.
        target = torch.device(device or "cpu")
        for scale in SCALES:
            sources[scale] = functools.partial(tiny_state_dict, scale)
    else:
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        for scale, path in ((2, weights_x2), (4, weights_x4)):
            if path:
                sources[scale] = WeightsFile(path, cache_dir=cache_dir, setting=f"UPSCALER_WEIGHTS_X{scale}")
    return Upscaler(
        sources=sources,
        device=target,
        tile_size=tile_size,
        tile_overlap=tile_overlap,
        keep_free_bytes=keep_free_bytes,
        compile_backend=compile_backend,
    )
