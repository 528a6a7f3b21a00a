"""What reading klein's text encoder costs at boot, whole (as diffusers loads it) or cut
(``handlers.engines.text_encoder.load_text_encoder``): seconds, and bytes read from disk.

A full-size text encoder (Qwen3-4B or Qwen3-8B, ``measurement.random_weights``) is written once as
the hub lays it out: ``text_encoder/`` with a config and bf16 safetensors shards with an index,
plus the transformer's config, which says which layers are stacked. Constant weights: a read costs
the same whatever the values. Each measurement starts with the folder evicted from the page cache
and ends with every kept parameter copied, as ``pipeline.to(device)`` would read it: transformers
maps safetensors files and reads on demand, so the load alone reads only what it touches.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from handlers.engines.text_encoder import load_text_encoder, stacked_layers, truncate_text_encoder
from measurement.page_cache import evict, resident_bytes
from measurement.random_weights import TEXT_ENCODER_CONFIGS, TRANSFORMER_CONFIGS

SHARD_BYTES = 4 << 30  # like the hub's text encoder shards: a few GB each
MODES = ("whole", "cut")
# --smoke: the official depth and stacking (layers 9, 18, 27 of 36) at a size that writes in a blink.
SMOKE = "smoke"
_SMOKE_TEXT_ENCODER: dict[str, Any] = {
    **TEXT_ENCODER_CONFIGS["klein-4b"],
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "vocab_size": 256,
}


def write_text_encoder(model: str, folder: Path) -> Path:
    """``folder`` with ``model``'s full-size text encoder (or ``SMOKE``'s small one) in bf16, written
    shard by shard (at most one shard in memory); kept if already written."""
    index_file = folder / "text_encoder" / "model.safetensors.index.json"
    if index_file.is_file():
        return folder
    smoke = model == SMOKE
    config = Qwen3Config(**(_SMOKE_TEXT_ENCODER if smoke else TEXT_ENCODER_CONFIGS[model]))
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in Qwen3ForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # a tied head is not in the files
    (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
    (folder / "transformer").mkdir(exist_ok=True)
    config.save_pretrained(folder / "text_encoder")
    stacked = 3 * config.hidden_size if smoke else TRANSFORMER_CONFIGS[model]["joint_attention_dim"]
    transformer_config = {"joint_attention_dim": stacked}
    (folder / "transformer" / "config.json").write_text(json.dumps(transformer_config))
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(shapes):  # the order save_pretrained writes
        nbytes = shapes[name].numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: torch.ones(shapes[name], dtype=torch.bfloat16) for name in names}
        save_file(tensors, folder / "text_encoder" / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
        del tensors
    total = sum(shape.numel() * 2 for shape in shapes.values())
    index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def measure(folder: Path, mode: str) -> dict[str, Any]:
    """One cold read of the text encoder in ``mode``: seconds to load, to read every kept
    parameter, and the bytes of the files read from disk (the page cache afterwards)."""
    files = sorted((folder / "text_encoder").glob("*.safetensors"))
    if not all(evict(file) for file in files):
        raise RuntimeError(f"the page cache kept {folder}'s files (tmpfs?): no cold read possible")
    joint_attention_dim = json.loads((folder / "transformer" / "config.json").read_text())[
        "joint_attention_dim"
    ]
    started = time.perf_counter()
    if mode == "whole":  # what Flux2KleinPipeline.from_pretrained does
        model = Qwen3ForCausalLM.from_pretrained(folder, subfolder="text_encoder", dtype=torch.bfloat16)
    else:
        model = load_text_encoder(
            str(folder), joint_attention_dim=joint_attention_dim, torch_dtype=torch.bfloat16
        )
    config = model.config
    last = max(
        stacked_layers(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            joint_attention_dim=joint_attention_dim,
        )
    )
    model = truncate_text_encoder(model, last)  # then build_engine's cut, which also drops the head
    loaded = time.perf_counter()
    for parameter in model.parameters():
        parameter.clone()  # read it, as a copy to the GPU would
    done = time.perf_counter()
    read = sum(resident_bytes(file) for file in files)
    layers = model.config.num_hidden_layers
    del model, parameter
    gc.collect()  # unmaps the files, so the next measurement's eviction can drop every page
    return {
        "mode": mode,
        "load_s": round(loaded - started, 3),
        "read_params_s": round(done - loaded, 3),
        "total_s": round(done - started, 3),
        "read_gb": round(read / 1e9, 3),
        "files_gb": round(sum(file.stat().st_size for file in files) / 1e9, 3),
        "layers_kept": layers,
    }
