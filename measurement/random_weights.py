"""Full-size FLUX.2-klein and Real-ESRGAN with random weights: true VRAM and latency, no download.

The benchmark (``scripts/benchmark_vram.py --random-weights``) measures a variant on a card
before its weights are fetched. Memory and speed depend only on the architecture, the dtype and
the kernels, never on the weight values, so the very classes of the real model are built from the
published full-size configs (``shared/reference/flux2-klein.md``) with random weights.

Modules are constructed directly on the target device in the target dtype: a 9B transformer
initialised on the CPU in float32 takes minutes and twice the memory. Only the tokenizer is
small (the tiny one from ``handlers/engines/tiny.py``): tokenizing costs nothing next to the
model, and prompts are still padded to the real 512 tokens, so the text encoder does the real work.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Unpack

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from transformers import Qwen3Config, Qwen3ForCausalLM

from handlers.engines.klein import REAL_MAX_SEQUENCE_LENGTH, KleinEngine
from handlers.engines.klein_loader import EngineOptions, build_engine
from handlers.engines.quantize import check_quantization, device_capability
from handlers.engines.tiny import build_tiny_tokenizer
from handlers.engines.upscaler import SCALES, StateDictSource, Upscaler
from handlers.engines.upscaler_loader import random_realesrgan

logger = logging.getLogger(__name__)

# Flux2Transformer2DModel configs of the published checkpoints (the rest are the class defaults:
# patch_size 1, in_channels 128, mlp_ratio 3.0, axes_dims_rope (32,)*4, rope_theta 2000).
TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "klein-4b": {
        "num_layers": 5,
        "num_single_layers": 20,
        "num_attention_heads": 24,
        "attention_head_dim": 128,
        "joint_attention_dim": 7680,
        "guidance_embeds": False,
    },
    "klein-9b": {
        "num_layers": 8,
        "num_single_layers": 24,
        "num_attention_heads": 32,
        "attention_head_dim": 128,
        "joint_attention_dim": 12288,
        "guidance_embeds": False,
    },
}

_QWEN3_COMMON: dict[str, Any] = {
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
}
# Qwen3-4B (klein-4B's text encoder) and Qwen3-8B (klein-9B's).
TEXT_ENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    "klein-4b": {
        **_QWEN3_COMMON,
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "tie_word_embeddings": True,
    },
    "klein-9b": {
        **_QWEN3_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "tie_word_embeddings": False,
    },
}

# Real-ESRGAN x2plus / x4plus: 64 filters, 23 RRDB blocks; x2 is the x4 body behind pixel-unshuffle.
ESRGAN_NUM_FILTERS = 64
ESRGAN_NUM_BLOCKS = 23


@contextmanager
def _building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on ``device`` in ``dtype`` (no CPU float32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def build_random_pipeline(
    model: str, *, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> Flux2KleinPipeline:
    """The full-size ``model`` ("klein-4b" or "klein-9b") pipeline with random weights on ``device``.

    ``device="meta"`` builds the structure without memory (parameter counts, config checks).
    """
    if model not in TRANSFORMER_CONFIGS:
        raise ValueError(f"no full-size config for {model!r}; expected one of {sorted(TRANSFORMER_CONFIGS)}")
    target = torch.device(device)
    tokenizer = build_tiny_tokenizer()
    # Pad prompts to the real length: the text encoder's cost depends on it.
    tokenizer.model_max_length = REAL_MAX_SEQUENCE_LENGTH
    torch.manual_seed(seed)
    # Any: diffusers' model classes reach mypy without torch.nn.Module's methods (pyproject's
    # override covers handlers.engines.* for the same reason).
    transformer: Any
    vae: Any
    with _building_on(target, dtype):
        transformer = Flux2Transformer2DModel(**TRANSFORMER_CONFIGS[model])
        text_config = Qwen3Config(**TEXT_ENCODER_CONFIGS[model])
        text_encoder = Qwen3ForCausalLM(text_config)
        vae = AutoencoderKLFlux2()  # the class defaults are the FLUX.2 VAE
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True
    )
    logger.info(
        "random %s built on %s: transformer %.2fB, text encoder %.2fB, VAE %.1fM parameters",
        model,
        target,
        _count(transformer) / 1e9,
        _count(text_encoder) / 1e9,
        _count(vae) / 1e6,
    )
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        is_distilled=True,
    )


def create_random_klein_engine(
    *,
    model: str,
    quantization: str = "none",
    device: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    **options: Unpack[EngineOptions],
) -> KleinEngine:
    """A ``KleinEngine`` over ``build_random_pipeline``, made by the worker's own ``build_engine``
    (text encoder truncation, fused QKV, quantization, compilation), so it measures what serves;
    ``options`` go to it as they are.

    The bf16 weights are created on the device before being quantized there, so an fp8 variant
    briefly needs its bf16 size on the card (~34 GB for klein-9B); a real-weight load quantizes
    one layer at a time from the CPU instead and never does.
    """
    target = torch.device(device or "cuda")
    capability = device_capability(target)
    check_quantization(quantization, capability=capability)  # before any allocation
    pipeline = build_random_pipeline(model, device=target, dtype=dtype)
    precision = quantization if quantization != "none" else "bf16"
    return build_engine(
        pipeline,
        name=f"flux2-klein-{model.removeprefix('klein-')}-{precision}-random",
        device=target,
        quantization=quantization,
        capability=capability,
        **options,
    )


def realesrgan_state_dict(scale: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with the exact layout of RealESRGAN_x2plus / x4plus."""
    network = random_realesrgan(
        scale, num_filters=ESRGAN_NUM_FILTERS, num_blocks=ESRGAN_NUM_BLOCKS, seed=seed
    )
    return network.state_dict()


def create_random_upscaler(*, device: str | None = None, compile_backend: str | None = None) -> Upscaler:
    """The worker's ``Upscaler`` over full-size random Real-ESRGAN x2/x4 (16.7M parameters each);
    ``compile_backend`` as COMPILE_REGIONS=upscaler sets it."""
    sources: dict[int, StateDictSource] = {
        scale: functools.partial(realesrgan_state_dict, scale) for scale in SCALES
    }
    return Upscaler(sources=sources, device=torch.device(device or "cuda"), compile_backend=compile_backend)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
