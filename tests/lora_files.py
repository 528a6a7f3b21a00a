"""Tiny LoRA adapter files for the tiny transformer, written the way training scripts write them.

``make_adapter`` trains nothing: it injects a peft LoRA with random (non-zero) weights into an
*unfused* tiny transformer, as real adapters are made, and saves it with diffusers'
``save_lora_weights`` (the safetensors layout ``load_lora_weights`` reads, with peft's config in
the header). The worker's transformer has fused QKV, so these files also exercise that mapping.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import Flux2KleinPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from handlers.engines.tiny import build_tiny_pipeline

# What a typical FLUX LoRA trains: attention projections (unfused), the MLPs, the single blocks.
TARGETS = (
    *("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"),
    *("linear_in", "to_qkv_mlp_proj"),
)


def make_adapter(directory: Path, *, seed: int, rank: int = 4, alpha: int = 8) -> bytes:
    """A random LoRA for the tiny transformer; the same seed gives the same file."""
    transformer = build_tiny_pipeline().transformer
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGETS), init_lora_weights=False)
    inject_adapter_in_model(config, transformer, adapter_name="default")
    state = get_peft_model_state_dict(transformer, adapter_name="default")
    out = directory / f"seed{seed}-r{rank}"
    Flux2KleinPipeline.save_lora_weights(
        out, transformer_lora_layers=state, transformer_lora_adapter_metadata=config.to_dict()
    )
    return (out / "pytorch_lora_weights.safetensors").read_bytes()


def safetensors_bytes(directory: Path, tensors: dict[str, torch.Tensor], name: str) -> bytes:
    path = directory / f"{name}.safetensors"
    save_file(tensors, str(path))
    return path.read_bytes()


def wrong_target_adapter(directory: Path) -> bytes:
    """A well-formed LoRA for layers this transformer does not have (an SDXL UNet's)."""
    return safetensors_bytes(
        directory,
        {
            "unet.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.randn(4, 320),
            "unet.down_blocks.0.attentions.0.to_q.lora_B.weight": torch.randn(320, 4),
        },
        "sdxl",
    )


def wrong_size_adapter(directory: Path, layer: str = "to_out.0") -> bytes:
    """A LoRA on the right layer names but for a wider model (another klein size)."""
    return safetensors_bytes(
        directory,
        {
            f"transformer.transformer_blocks.0.attn.{layer}.lora_A.weight": torch.randn(4, 64),
            f"transformer.transformer_blocks.0.attn.{layer}.lora_B.weight": torch.randn(64, 4),
        },
        f"wide-{layer}",
    )
