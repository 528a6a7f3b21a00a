"""What reading klein's text encoder costs at boot, whole (as diffusers loads it) or cut
(``handlers.engines.text_encoder.load_text_encoder``): seconds, and bytes read from disk.

A full-size text encoder (Qwen3-4B or Qwen3-8B) is written once as the hub lays it out
(``measurement.weights_folder``: constant bf16 shards with an index, and the transformer's config,
which says which layers are stacked). Each measurement starts with the folder evicted from the
page cache and ends with every kept parameter copied, as ``pipeline.to(device)`` would read it: transformers
maps safetensors files and reads on demand, so the load alone reads only what it touches.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3ForCausalLM

from handlers.engines.text_encoder import load_text_encoder, truncate_text_encoder
from klein_facts.text_encoder import stacked_layers
from measurement.page_cache import evict, resident_bytes

MODES = ("whole", "cut")


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
        "read_bytes": read,
        "files_bytes": sum(file.stat().st_size for file in files),
        "layers_kept": layers,
    }
