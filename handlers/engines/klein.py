"""The FLUX.2-klein engine: one loaded ``Flux2KleinPipeline``, its warm-up and the single call the
handler needs.

Created once at boot (``handlers.engines.klein_loader.create_klein_engine``) and passed to the
generate handler. A batch of
prompts is one pipeline call with one CPU generator per image, so image *i* depends only on its
prompt, its seed and the shared references (up to float rounding of batched kernels, see
``generate``). A CUDA out-of-memory error is not caught here: it reaches the handler unchanged,
which maps it to ``out_of_memory`` and calls ``free_memory``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Collection, Sequence

import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from handlers.engines.lora import LoraAdapters
from handlers.engines.speed import compile_pipeline, compile_regions_checked
from handlers.errors import InvalidInput
from klein_facts.text_encoder import REAL_TEXT_ENCODER_OUT_LAYERS

logger = logging.getLogger(__name__)

# The official prompt embedding: Qwen3 layers 9, 18, 27 stacked (klein_facts.text_encoder), prompts
# padded to 512 tokens.
REAL_MAX_SEQUENCE_LENGTH = 512

# Flux2ImageProcessor.check_image_input's limits, checked up front so a bad reference is an
# ``invalid_input`` naming the image rather than a ValueError from deep inside diffusers.
MIN_REFERENCE_SIDE = 64
MAX_REFERENCE_ASPECT = 8.0

# warm_up(): smallest size the pipeline accepts comfortably; one step touches every kernel.
WARMUP_SIZE = 256
WARMUP_STEPS = 1

# What a compiled engine compiles by default (COMPILE_SIZES): (batch, width, height). Only these
# shapes are compiled at boot; after the warm-up dynamo's stance turns a new shape into an eager
# run (see ``KleinEngine.warm_up``), so no job ever waits on a compile.
DEFAULT_COMPILE_SIZES: tuple[tuple[int, int, int], ...] = ((1, 1024, 1024),)


class KleinEngine:
    """A loaded klein pipeline on one device."""

    def __init__(
        self,
        *,
        pipeline: Flux2KleinPipeline,
        name: str,
        device: torch.device,
        text_encoder_out_layers: Sequence[int] = REAL_TEXT_ENCODER_OUT_LAYERS,
        max_sequence_length: int = REAL_MAX_SEQUENCE_LENGTH,
        compiled: bool = False,
        loras: LoraAdapters | None = None,
        compile_sizes: Sequence[tuple[int, int, int]] = DEFAULT_COMPILE_SIZES,
        attention_backend: str | None = None,
        compile_regions: Collection[str] = (),
    ) -> None:
        self.pipeline = pipeline
        self.attention_backend = attention_backend
        self.compiled = compiled
        # What compile_pipeline compiled (klein_facts.compile_regions), sorted so the compile
        # cache key can name it; empty for an engine that runs eager.
        self.compile_regions = tuple(sorted(compile_regions)) if compiled else ()
        # compile_pipeline's calls that the next run makes (compile_at_first_run).
        self._to_wrap: list[tuple[tuple[str, ...], str, bool]] = []
        self.loras = loras  # None: this worker takes no LoRA adapters (MAX_LORAS=0)
        self.compile_sizes = tuple(compile_sizes)
        self.name = name
        self.device = device
        self.text_encoder_out_layers = tuple(text_encoder_out_layers)
        self.max_sequence_length = max_sequence_length
        # Output sizes must be multiples of this (VAE 8x down, then 2x2 latent patches).
        self.size_multiple = pipeline.vae_scale_factor * 2
        self.is_distilled = bool(pipeline.config.get("is_distilled", False))
        pipeline.set_progress_bar_config(disable=True)

    def generate(
        self,
        *,
        prompts: list[str],
        seeds: list[int],
        references: list[Image.Image],
        width: int,
        height: int,
        num_steps: int,
        guidance_scale: float,
    ) -> list[Image.Image]:
        """Generate one image per prompt, exactly ``width`` x ``height``, in one pipeline call.

        Image *i* is seeded by its own CPU generator, so the same (prompt, seed, references) gives
        the same image alone or in any batch, up to float rounding: batched matrix kernels may sum
        in a different order, which moves a few pixels by one 8-bit level (tested on CPU).
        """
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
        if width % self.size_multiple or height % self.size_multiple:
            raise InvalidInput(f"width/height: {width}x{height} is not a multiple of {self.size_multiple}")
        images = _checked_references(references)
        if self.is_distilled and guidance_scale > 1.0:
            # Step-distilled checkpoints have no classifier-free guidance; diffusers would ignore the
            # value anyway, but warn on every call.
            logger.debug("guidance_scale %s ignored by the distilled model %s", guidance_scale, self.name)
            guidance_scale = 1.0
        self._wrap_compiled_regions()
        # CPU generators: the same noise whatever the device, and one per image for per-item seeds.
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        with torch.inference_mode():
            output = self.pipeline(
                image=images or None,
                prompt=list(prompts),
                width=width,
                height=height,
                num_inference_steps=num_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="pt",
                max_sequence_length=self.max_sequence_length,
                text_encoder_out_layers=self.text_encoder_out_layers,
            )
            return to_pil(output.images)

    def compile_at_first_run(
        self, regions: Collection[str], *, backend: str = "inductor", dynamic: bool = True
    ) -> None:
        """Have the next run wrap ``regions`` for compiling (``speed.compile_pipeline``; ``dynamic``:
        shape-generic transformer and VAE graphs), and count them among the compiled regions.

        Deferred, not done here: the boot loads the compile cache between building the engine and
        its warm-up, and torch takes a precompiled function from that cache when ``torch.compile``
        wraps it, not when it first runs (``worker/compile_boot.py``).
        """
        chosen = compile_regions_checked(regions)
        if chosen:
            self._to_wrap.append((chosen, backend, dynamic))
            self.compiled = True
            self.compile_regions = tuple(sorted({*self.compile_regions, *chosen}))

    def _wrap_compiled_regions(self) -> None:
        while self._to_wrap:
            regions, backend, dynamic = self._to_wrap.pop(0)
            compile_pipeline(self.pipeline, regions=regions, backend=backend, dynamic=dynamic)

    def warm_up(self) -> None:
        """Small generations, so the first job does not pay for lazy init, kernel selection or compiling.

        A compiled engine runs exactly its ``compile_sizes`` (the first call compiles, or loads the
        compiled graphs from the cache), then sets dynamo's stance to ``eager_on_recompile``: a job
        at any other shape runs eager (slower, but at once) instead of stalling on a recompile.
        Each size runs every compiled region, the text encoder included: it sees (batch, prompt
        length) whatever the image size, so a job at another size reuses its graph, and one at
        another batch above 1 does too once the sizes held two batches (see
        ``speed.compile_text_encoder``).
        """
        shapes = self.compile_sizes if self.compiled else ((1, WARMUP_SIZE, WARMUP_SIZE),)
        for batch, width, height in shapes:
            self.generate(
                prompts=["warm-up"] * batch,
                seeds=list(range(batch)),
                references=[],
                width=width,
                height=height,
                num_steps=WARMUP_STEPS,
                guidance_scale=1.0,
            )
        if "text_encoder" in self.compile_regions:
            self._warm_up_full_length_prompts(sorted({batch for batch, _, _ in shapes}))
        if self.compiled:
            torch.compiler.set_stance("eager_on_recompile")

    def _warm_up_full_length_prompts(self, batches: list[int]) -> None:
        """Compile the text encoder's second graph: prompts that fill every token have no padding,
        so transformers passes no attention mask (SDPA's causal path instead of a mask tensor), and
        the layers' graph for a mask would not fit. Text encoder only: the image does not depend on it.
        """
        long_prompt = " ".join(["warm-up"] * self.max_sequence_length)  # at least one token a word
        for batch in batches:
            with torch.inference_mode():
                self.pipeline.encode_prompt(
                    prompt=[long_prompt] * batch,
                    max_sequence_length=self.max_sequence_length,
                    text_encoder_out_layers=self.text_encoder_out_layers,
                )

    def free_memory(self) -> None:
        """Drop dead tensors and return cached CUDA blocks (after an OOM, or between big jobs)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [0, 1] -> RGB images, bit-identical to diffusers' ``output_type="pil"``.

    Diffusers copies the float image to the host and scales and rounds it there with numpy; here
    the same float32 arithmetic runs on the device and only the uint8 pixels cross: a quarter of
    the bytes, and on this project's 2-core CI machine 6 ms instead of 26 ms per 1024x1024 image.
    """
    pixels = (images.float() * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return [Image.fromarray(array) for array in pixels.cpu().numpy()]


def _checked_references(references: Sequence[Image.Image]) -> list[Image.Image]:
    checked = []
    for index, image in enumerate(references):
        width, height = image.size
        if min(width, height) < MIN_REFERENCE_SIDE:
            raise InvalidInput(
                f"images[{index}]: {width}x{height} is too small, both sides must be at least "
                f"{MIN_REFERENCE_SIDE} px"
            )
        if max(width, height) / min(width, height) > MAX_REFERENCE_ASPECT:
            raise InvalidInput(
                f"images[{index}]: aspect ratio of {width}x{height} exceeds {MAX_REFERENCE_ASPECT:g}:1"
            )
        checked.append(image if image.mode == "RGB" else image.convert("RGB"))
    return checked
