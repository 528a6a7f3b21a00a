"""The FLUX.2-klein engine: one loaded ``Flux2KleinPipeline`` and the single call the handler needs.

Created once at boot (``create_klein_engine``) and passed to the generate handler. A batch of
prompts is one pipeline call with one CPU generator per image, so image *i* depends only on its
prompt, its seed and the shared references (up to float rounding of batched kernels, see
``generate``). A CUDA out-of-memory error is not caught here: it reaches the handler unchanged,
which maps it to ``out_of_memory`` and calls ``free_memory``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from handlers.errors import InvalidInput

logger = logging.getLogger(__name__)

HUB_IDS: dict[str, str] = {
    "klein-4b": "black-forest-labs/FLUX.2-klein-4B",
    "klein-9b": "black-forest-labs/FLUX.2-klein-9B",
}
MODELS = ("tiny", *HUB_IDS)

# The official prompt embedding: Qwen3 layers 9, 18, 27 stacked, prompts padded to 512 tokens.
REAL_TEXT_ENCODER_OUT_LAYERS: tuple[int, ...] = (9, 18, 27)
REAL_MAX_SEQUENCE_LENGTH = 512

# Flux2ImageProcessor.check_image_input's limits, checked up front so a bad reference is an
# ``invalid_input`` naming the image rather than a ValueError from deep inside diffusers.
MIN_REFERENCE_SIDE = 64
MAX_REFERENCE_ASPECT = 8.0

# warm_up(): smallest size the pipeline accepts comfortably; one step touches every kernel.
WARMUP_SIZE = 256
WARMUP_STEPS = 1

# Quantization backends by name. Each mutates the loaded pipeline in place (e.g. torchao on the
# transformer). None are wired yet: asking for one is a clear boot error, not a silent bf16 run.
Quantizer = Callable[[Flux2KleinPipeline], None]
QUANTIZERS: dict[str, Quantizer] = {}
KNOWN_QUANTIZATIONS = ("none", "fp8", "int8", "nunchaku-int4", "nunchaku-fp4")


class UnsupportedQuantization(NotImplementedError):
    """The requested quantization backend is not available in this build."""


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
    ) -> None:
        self.pipeline = pipeline
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
                output_type="pil",
                max_sequence_length=self.max_sequence_length,
                text_encoder_out_layers=self.text_encoder_out_layers,
            )
        return list(output.images)

    def warm_up(self) -> None:
        """One small generation, so the first job does not pay for lazy init and kernel selection."""
        self.generate(
            prompts=["warm-up"],
            seeds=[0],
            references=[],
            width=WARMUP_SIZE,
            height=WARMUP_SIZE,
            num_steps=WARMUP_STEPS,
            guidance_scale=1.0,
        )

    def free_memory(self) -> None:
        """Drop dead tensors and return cached CUDA blocks (after an OOM, or between big jobs)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


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


def load_pipeline(
    source: str, *, torch_dtype: torch.dtype, token: str | None = None, cache_dir: str | None = None
) -> Flux2KleinPipeline:
    """Load a klein pipeline from a hub id or a local diffusers folder (``save_pretrained`` layout)."""
    local = Path(source).is_dir()
    logger.info("loading FLUX.2-klein pipeline from %s %s", "folder" if local else "hub", source)
    return Flux2KleinPipeline.from_pretrained(
        source,
        dtype=torch_dtype,
        token=token,
        cache_dir=cache_dir,
        # A local folder must never trigger a hub lookup (offline boxes, gated repos).
        local_files_only=local,
    )


def quantizer_for(quantization: str) -> Quantizer | None:
    """The backend for ``quantization`` (None for "none"), or a clear error before any weight loads."""
    if quantization == "none":
        return None
    if quantization == "auto":
        raise ValueError("quantization 'auto' must be resolved to a concrete choice at boot")
    if quantization not in KNOWN_QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {KNOWN_QUANTIZATIONS}")
    quantizer = QUANTIZERS.get(quantization)
    if quantizer is None:
        raise UnsupportedQuantization(
            f"quantization {quantization!r} is not available in this build; use QUANTIZATION=none (bf16)"
        )
    return quantizer


def prompt_settings(pipeline: Flux2KleinPipeline) -> tuple[tuple[int, ...], int]:
    """Text-encoder layers to stack and the prompt length, from the loaded model's own configs.

    The official checkpoints stack layers (9, 18, 27) of a 36-layer Qwen3. A smaller text encoder
    (the tiny model saved to a folder) cannot have those, so it stacks its last N layers, N being
    what the transformer's ``joint_attention_dim`` expects.
    """
    text_config = pipeline.text_encoder.config
    num_stacked = pipeline.transformer.config.joint_attention_dim // text_config.hidden_size
    num_layers = text_config.num_hidden_layers
    if num_stacked == len(REAL_TEXT_ENCODER_OUT_LAYERS) and num_layers >= max(REAL_TEXT_ENCODER_OUT_LAYERS):
        layers = REAL_TEXT_ENCODER_OUT_LAYERS
    else:
        layers = tuple(range(num_layers - num_stacked + 1, num_layers + 1))
    max_length = min(REAL_MAX_SEQUENCE_LENGTH, int(pipeline.tokenizer.model_max_length))
    return layers, max_length


def create_klein_engine(
    *,
    model: str,
    model_path: str | None = None,
    quantization: str = "none",
    device: str | None = None,
    hf_token: str | None = None,
    cache_dir: str | None = None,
    dtype: torch.dtype | None = None,
) -> KleinEngine:
    """Build the engine for ``model`` ("tiny", "klein-4b", "klein-9b") on ``device``.

    ``tiny`` builds random weights in-process (float32, CPU unless a device is given). The real
    variants load ``model_path`` or their hub id in bf16; ``dtype`` overrides that (tests run a
    saved tiny folder in float32 on CPU). ``quantization`` "auto" must be resolved by boot first.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    if model == "tiny" and quantization == "auto":
        # Random weights have nothing to pick a precision for; "auto" simply means full precision.
        quantization = "none"
    quantizer = quantizer_for(quantization)  # before loading: a bad choice costs no download
    if model == "tiny":
        from handlers.engines.tiny import build_tiny_pipeline

        target = torch.device(device or "cpu")
        torch_dtype = dtype or torch.float32
        pipeline = build_tiny_pipeline()
        if torch_dtype != torch.float32:  # built in float32; cast only when asked (e.g. bf16 on a GPU)
            pipeline.to(dtype=torch_dtype)
    else:
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = dtype or torch.bfloat16
        source = model_path or HUB_IDS[model]
        pipeline = load_pipeline(source, torch_dtype=torch_dtype, token=hf_token, cache_dir=cache_dir)
    # Quantize before moving, so a variant that fits the card only once quantized can still load.
    if quantizer is not None:
        quantizer(pipeline)
    pipeline.to(target)
    layers, max_length = prompt_settings(pipeline)
    name = f"flux2-klein-{model.removeprefix('klein-')}"
    if model != "tiny":
        name += f"-{_precision_label(quantization, torch_dtype)}"
    logger.info(
        "klein engine %s ready on %s (text layers %s, max %d tokens)", name, target, layers, max_length
    )
    return KleinEngine(
        pipeline=pipeline,
        name=name,
        device=target,
        text_encoder_out_layers=layers,
        max_sequence_length=max_length,
    )


def _precision_label(quantization: str, dtype: torch.dtype) -> str:
    if quantization != "none":
        return quantization
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
