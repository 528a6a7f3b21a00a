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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from handlers.engines.lora import LoraAdapters, create_lora_adapters
from handlers.engines.quantize import (
    Capability,
    check_quantization,
    device_capability,
    load_nunchaku_transformer,
    quantize_pipeline,
)
from handlers.engines.quantize import Quantizer as Quantizer
from handlers.engines.quantize import UnsupportedQuantization as UnsupportedQuantization
from handlers.engines.quantize import quantizer_for as quantizer_for
from handlers.engines.speed import (
    compile_pipeline,
    enable_fast_math,
    fuse_qkv,
    set_attention_backend,
    truncate_text_encoder,
)
from handlers.errors import InvalidInput
from klein_facts.variants import NUNCHAKU_QUANTIZATIONS, TORCHAO_QUANTIZATIONS

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
    ) -> None:
        self.pipeline = pipeline
        self.attention_backend = attention_backend
        self.compiled = compiled
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

    def warm_up(self) -> None:
        """Small generations, so the first job does not pay for lazy init, kernel selection or compiling.

        A compiled engine runs exactly its ``compile_sizes`` (the first call compiles, or loads the
        compiled graphs from the cache), then sets dynamo's stance to ``eager_on_recompile``: a job
        at any other shape runs eager (slower, but at once) instead of stalling on a recompile.
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
        if self.compiled:
            torch.compiler.set_stance("eager_on_recompile")

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


def load_pipeline(
    source: str,
    *,
    torch_dtype: torch.dtype,
    token: str | None = None,
    cache_dir: str | None = None,
    **components: Any,
) -> Flux2KleinPipeline:
    """Load a klein pipeline from a hub id or a local diffusers folder (``save_pretrained`` layout).

    ``components`` replace the named parts instead of loading them (a nunchaku transformer).
    """
    local = Path(source).is_dir()
    logger.info("loading FLUX.2-klein pipeline from %s %s", "folder" if local else "hub", source)
    return Flux2KleinPipeline.from_pretrained(
        source,
        dtype=torch_dtype,
        token=token,
        cache_dir=cache_dir,
        # A local folder must never trigger a hub lookup (offline boxes, gated repos).
        local_files_only=local,
        **components,
    )


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
    compile: bool = False,
    compile_sizes: Sequence[tuple[int, int, int]] = DEFAULT_COMPILE_SIZES,
    nunchaku_transformer: str | None = None,
    max_loras: int = 0,
    lora_max_rank: int = 64,
    attention_backend: str | None = None,
) -> KleinEngine:
    """Build the engine for ``model`` ("tiny", "klein-4b", "klein-9b") on ``device``.

    ``tiny`` builds random weights in-process (float32, CPU unless a device is given). The real
    variants load ``model_path`` or their hub id in bf16 (``cache_dir``: the hub cache, e.g.
    ``$HF_HOME/hub``); ``dtype`` overrides that (tests run a saved tiny folder in float32 on CPU).
    ``quantization`` "auto" must be resolved by boot first; every quantization problem is raised
    before a weight loads. ``compile``: see ``build_engine``; ``compile_sizes``: what the warm-up compiles.
    ``nunchaku_transformer``: a nunchaku-quantized FLUX.2 transformer folder, for nunchaku-*.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    if model == "tiny" and quantization == "auto":
        # Random weights have nothing to pick a precision for; "auto" simply means full precision.
        quantization = "none"
    default_device = "cpu" if model == "tiny" else ("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.device(device or default_device)
    capability = device_capability(target)
    check_quantization(quantization, capability=capability, nunchaku_transformer=nunchaku_transformer)
    if model == "tiny":
        from handlers.engines.tiny import build_tiny_pipeline

        torch_dtype = dtype or torch.float32
        pipeline = build_tiny_pipeline()
        if torch_dtype != torch.float32:  # built in float32; cast only when asked (e.g. bf16 on a GPU)
            pipeline.to(dtype=torch_dtype)
        name = "flux2-klein-tiny"
    else:
        torch_dtype = dtype or torch.bfloat16
        components = {}
        if quantization in NUNCHAKU_QUANTIZATIONS and nunchaku_transformer:
            components["transformer"] = load_nunchaku_transformer(nunchaku_transformer, device=target)
        source = model_path or HUB_IDS[model]
        pipeline = load_pipeline(
            source, torch_dtype=torch_dtype, token=hf_token, cache_dir=cache_dir, **components
        )
        name = f"flux2-klein-{model.removeprefix('klein-')}-{_precision_label(quantization, torch_dtype)}"
    return build_engine(
        pipeline,
        name=name,
        device=target,
        quantization=quantization,
        compile=compile,
        capability=capability,
        max_loras=max_loras,
        lora_max_rank=lora_max_rank,
        compile_sizes=compile_sizes,
        attention_backend=attention_backend,
    )


def build_engine(
    pipeline: Flux2KleinPipeline,
    *,
    name: str,
    device: torch.device,
    quantization: str = "none",
    compile: bool = False,
    compile_sizes: Sequence[tuple[int, int, int]] = DEFAULT_COMPILE_SIZES,
    capability: Capability | None = None,
    max_loras: int = 0,
    lora_max_rank: int = 64,
    attention_backend: str | None = None,
) -> KleinEngine:
    """Make a loaded pipeline (on the CPU, or already on ``device``) the engine, in this order:

    1. truncate the text encoder after its last used layer (always; bit-identical embeddings),
    2. fuse the transformer's QKV projections (always),
    3. quantize (fp8/int8), one Linear at a time onto ``device``, before the rest moves there,
    4. move to ``device``,
    5. LoRA adapter handling for ``max_loras`` per job (compiled: hotswap slots, which must exist
       before compiling; see ``handlers.engines.lora``),
    6. compile the transformer blocks and the VAE decoder (with ``compile``; on a CPU inductor builds
       C++, which serves the tests of the compiled path and the compile cache).
    """
    layers, max_length = prompt_settings(pipeline)
    pipeline.text_encoder = truncate_text_encoder(pipeline.text_encoder, max(layers))
    nunchaku = quantization in NUNCHAKU_QUANTIZATIONS  # its transformer comes fused and compiled
    if not nunchaku:
        fuse_qkv(pipeline.transformer)
    if quantization in TORCHAO_QUANTIZATIONS:
        quantize_pipeline(pipeline, quantization, device=device, capability=capability)
    pipeline.to(device)
    if attention_backend:  # after the QKV fusion, which rebuilds no processor but is done first anyway
        set_attention_backend(pipeline.transformer, attention_backend)
    compiled = compile and not nunchaku
    if device.type == "cuda":
        enable_fast_math()
    loras = create_lora_adapters(
        pipeline, quantization=quantization, max_loras=max_loras, max_rank=lora_max_rank, hotswap=compiled
    )
    if compiled:
        compile_pipeline(pipeline)
    logger.info(
        "klein engine %s ready on %s (text layers %s, max %d tokens, compiled %s)",
        name,
        device,
        layers,
        max_length,
        compiled,
    )
    return KleinEngine(
        pipeline=pipeline,
        name=name,
        device=device,
        text_encoder_out_layers=layers,
        max_sequence_length=max_length,
        compiled=compiled,
        loras=loras,
        compile_sizes=compile_sizes,
        attention_backend=attention_backend,
    )


def _precision_label(quantization: str, dtype: torch.dtype) -> str:
    if quantization != "none":
        return quantization
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
