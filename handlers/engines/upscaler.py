"""Real-ESRGAN x2/x4 through ``spandrel``, loaded on demand, with tiled inference for big inputs.

``spandrel`` reads any ESRGAN-family checkpoint (Real-ESRGAN x2plus's pixel-unshuffle input
included) without the ``realesrgan``/``basicsr`` packages, which break on current torchvision.
``MODEL=tiny`` gets a small random-weight RRDBNet of the same architecture, passed through the
same ``ModelLoader().load_from_state_dict`` path as a real checkpoint (handlers/engines/upscaler_loader.py
makes the sources).
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from spandrel import ImageModelDescriptor, ModelLoader
from spandrel.architectures.__arch_helpers.block import RRDB

from handlers.engines.speed import compile_forward
from handlers.engines.tiling import run_tiled
from handlers.errors import InvalidInput
from klein_facts.variants import GIB

logger = logging.getLogger(__name__)

SCALES = (2, 4)

# Input tile side, used when the whole image does not fit in free VRAM. Measured on an H100
# (BENCHMARKS.md), x4 of 1024x1024 in fp16 next to klein-4B: 512 px tiles 0.625 s and 1.3 GiB
# above klein at rest; untiled 0.334 s and 4.0 GiB. So untiled runs whenever it fits.
DEFAULT_TILE_SIZE = 512
# Untiled VRAM per output pixel: the 4.0 GiB of a 4096x4096 output is ~260 bytes; the margin
# covers the x2 model's pixel-unshuffle layout and allocator rounding. An estimate that is still
# too low costs one out-of-memory, after which the same image runs tiled.
UNTILED_BYTES_PER_OUTPUT_PIXEL = 320
# Context shared by neighbouring tiles, blended with linear ramps so no seam shows.
DEFAULT_TILE_OVERLAP = 32

# after_job(): keep the models loaded while at least this much VRAM stays free for the next job
# (a 1024x1024 batch's activations and VAE decode on top of klein at rest). The x4 model is only
# 33 MB in fp16; what a release really returns is the allocator cache of the tiled upscale.
DEFAULT_KEEP_FREE_BYTES = 4 << 30

# warm_up(): one image per scale. Not square, or dynamo would tie width and height to one size
# symbol and a non-square job would miss the graph; and not tiny, because the convolution backend
# torch picks (hence a guard of the compiled graph) depends on the input's size: a graph traced on
# a toy input refuses real images. 320x256 is beyond that threshold and under one tile.
WARMUP_SIZE = (320, 256)

StateDictSource = Callable[[], dict[str, torch.Tensor]]
FreeMemoryReader = Callable[[], int]


class Upscaler:
    """One ESRGAN-family model per scale, loaded on first use and dropped by ``release``."""

    def __init__(
        self,
        *,
        sources: dict[int, StateDictSource],
        device: torch.device,
        tile_size: int = DEFAULT_TILE_SIZE,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        keep_free_bytes: int = DEFAULT_KEEP_FREE_BYTES,
        free_memory: FreeMemoryReader | None = None,
        compile_backend: str | Callable[..., Any] | None = None,
    ) -> None:
        """``free_memory`` reads the VRAM the next job could use; by default the CUDA reading on a
        GPU and none on the CPU (where there is no VRAM to hand back, so models stay loaded).
        ``compile_backend`` (COMPILE_REGIONS naming "upscaler"): every model is compiled as it
        loads (``compile_blocks``); the boot's ``warm_up`` pays the compile before any job."""
        if tile_size > 0 and not 0 <= 2 * tile_overlap < tile_size:
            raise ValueError(f"tile overlap {tile_overlap} must be under half the tile size {tile_size}")
        self.sources = sources
        self.device = device
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.keep_free_bytes = keep_free_bytes
        if free_memory is None and device.type == "cuda":
            free_memory = functools.partial(cuda_free_bytes, device)
        self.free_memory = free_memory
        self.compile_backend = compile_backend
        self._models: dict[int, ImageModelDescriptor] = {}

    def ensure_loaded(self, scale: int) -> float:
        """Load the ``scale`` model if needed; return the seconds spent (0.0 when already loaded)."""
        if scale in self._models:
            return 0.0
        if scale not in self.sources:
            # The job asked for what this worker was configured not to serve: no retry helps.
            raise InvalidInput(
                f"scale: x{scale} is not available on this worker (UPSCALER_WEIGHTS_X{scale} is unset); "
                f"available: {', '.join(f'x{s}' for s in sorted(self.sources)) or 'none'}"
            )
        started = time.perf_counter()
        descriptor = ModelLoader(device=self.device).load_from_state_dict(self.sources[scale]())
        if not isinstance(descriptor, ImageModelDescriptor) or descriptor.scale != scale:
            found = getattr(descriptor, "scale", "?")
            raise ValueError(
                f"upscaler weights for x{scale} hold a x{found} {descriptor.architecture.name} model"
            )
        descriptor.eval()
        if self.device.type == "cuda":
            # fp16 halves time and memory at no visible cost; channels_last is ~2x faster again.
            if descriptor.supports_half:
                descriptor.half()
            descriptor.model.to(memory_format=torch.channels_last)
        if self.compile_backend:
            compile_blocks(descriptor.model, backend=self.compile_backend)
        self._models[scale] = descriptor
        elapsed = time.perf_counter() - started
        logger.info("upscaler x%d loaded (%s) in %.2fs", scale, descriptor.architecture.name, elapsed)
        return elapsed

    @property
    def compiled(self) -> bool:
        return self.compile_backend is not None

    def warm_up(self) -> list[int]:
        """Load every available scale and upscale one image with it: a compiled upscaler compiles
        (or takes from the compile cache) its graphs here, at boot, not in the first upscale job.
        Returns the scales warmed."""
        pixels = np.random.default_rng(0).integers(0, 256, (*WARMUP_SIZE[::-1], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        for scale in sorted(self.sources):
            self.upscale(image, scale)
        return sorted(self.sources)

    def fetch(self) -> None:
        """Bring every checkpoint file into the cache now (boot), without loading a model."""
        for source in self.sources.values():
            fetch = getattr(source, "fetch", None)  # a checkpoint file (upscaler_loader.WeightsFile)
            if fetch is not None:
                fetch()

    def upscale(self, image: Image.Image, scale: int) -> Image.Image:
        """Return ``image`` upscaled to exactly ``scale`` x its size, as RGB."""
        self.ensure_loaded(scale)
        descriptor = self._models[scale]
        pixels = np.array(image.convert("RGB"))  # a writable copy: torch will not wrap read-only memory
        with torch.inference_mode():
            tensor = torch.from_numpy(pixels).to(self.device).permute(2, 0, 1).unsqueeze(0)
            tensor = tensor.to(descriptor.dtype).div_(255.0)
            if self.device.type == "cuda":
                tensor = tensor.contiguous(memory_format=torch.channels_last)
            tile = self.tile_for(image.width, image.height, scale)
            output = self._run(descriptor, tensor, scale, tile)
            if output is None:  # untiled ran out of memory; the failed attempt's tensors are gone now
                logger.warning(
                    "upscale x%d of %dx%d untiled ran out of memory; retrying in %d px tiles",
                    scale,
                    image.width,
                    image.height,
                    self.tile_size,
                )
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                output = self._run(descriptor, tensor, scale, self.tile_size)
                assert output is not None
            result = output[0].clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(result)

    def tile_for(self, width: int, height: int, scale: int) -> int:
        """The tile side for this upscale: 0 (one piece, twice as fast) when the untiled estimate
        fits in the free VRAM, else the configured tiles. Without a VRAM reading (CPU), as configured."""
        if self.tile_size <= 0 or self.free_memory is None:
            return self.tile_size
        needed = width * height * scale * scale * UNTILED_BYTES_PER_OUTPUT_PIXEL
        return 0 if self.free_memory() >= needed else self.tile_size

    def _run(
        self, descriptor: ImageModelDescriptor, tensor: torch.Tensor, scale: int, tile: int
    ) -> torch.Tensor | None:
        """``run_tiled`` with ``tile``; None when an untiled attempt runs out of memory (a tiled
        one re-raises: the handler reports ``out_of_memory``)."""
        try:
            return run_tiled(
                descriptor,
                tensor,
                scale=scale,
                tile_size=tile,
                overlap=self.tile_overlap,
                align=descriptor.size_requirements.multiple_of,
            )
        except torch.OutOfMemoryError:
            if tile == self.tile_size:
                raise
            return None

    def release(self) -> None:
        """Drop every loaded model and hand cached GPU memory back."""
        self._models.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def after_job(self) -> bool:
        """Release the models unless enough VRAM stays free to keep them; True when released.

        Called by the worker after every job that used the upscaler: keeping the model saves the
        next upscale its load (0.1-0.2 s), releasing it hands its memory to klein when tight.
        """
        if not self._models or self.free_memory is None:
            return False
        free = self.free_memory()
        if free >= self.keep_free_bytes:
            return False
        logger.info(
            "upscaler released: %.1f GiB free < %.1f GiB to keep it",
            free / GIB,
            self.keep_free_bytes / GIB,
        )
        self.release()
        return True

    @property
    def loaded_scales(self) -> list[int]:
        return sorted(self._models)


def compile_blocks(network: torch.nn.Module, *, backend: str | Callable[..., Any] = "inductor") -> int:
    """Compile ``network`` in place, region by region, shape-generic; returns the modules compiled.

    The region is RRDBNet's repeated block (Real-ESRGAN x2plus/x4plus: 23 residual-in-residual
    dense blocks, ~92% of x4plus's multiply-adds): one graph, compiled once and reused by
    every block, so the compile costs a fraction of the whole network's. What lies around it (the
    first conv, the nearest-neighbour upsampling convs) stays eager. A network of another ESRGAN-
    family layout, without such blocks, is compiled whole. ``dynamic=True``: tiles, whole images
    and their edges all have different sizes, and each new static shape would be a recompile.
    """
    blocks = [module for module in network.modules() if isinstance(module, RRDB)]
    for module in blocks or [network]:
        compile_forward(module, fullgraph=True, dynamic=True, backend=backend)
    logger.info(
        "upscaler: %d %s compiled lazily (backend %s)",
        len(blocks) or 1,
        "blocks" if blocks else "network",
        backend,
    )
    return len(blocks) or 1


def cuda_free_bytes(device: torch.device) -> int:
    """VRAM this process could allocate now: the driver's free memory plus the blocks torch's
    caching allocator holds but does not use (klein, in this process, reuses them directly)."""
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
