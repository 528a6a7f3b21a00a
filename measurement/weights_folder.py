"""A full-size klein folder on disk, for benchmarks of what a boot reads: the hub's layout
(``model_index.json``, each component's config, bf16 safetensors shards with an index), every
weight a constant. Reading costs the same whatever the values, and constants write at disk speed
where random numbers would take minutes to draw. Only the tokenizer is the tiny one: a few kB.

The modules are built on the meta device (``measurement.random_weights.build_random_pipeline``), so
no weight is ever held in memory whole: one shard at a time is.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from handlers.engines.tiny import TEXT_HIDDEN_SIZE, build_tiny_pipeline
from measurement.random_weights import TEXT_ENCODER_CONFIGS, build_random_pipeline

SHARD_BYTES = 4 << 30  # like the hub's shards: a few GB each
SMOKE = "smoke"  # the tiny pipeline with a text encoder of the official depth (36 layers), for tests
COMPONENTS = ("transformer", "vae", "text_encoder")
# The file names diffusers (the transformer, the VAE) and transformers (the text encoder) load.
_STEMS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def write_klein_folder(model: str, folder: Path, *, weights: Collection[str] = COMPONENTS) -> Path:
    """``folder`` as the hub lays out ``model`` ("klein-4b", "klein-9b" or ``SMOKE``), with the weights
    of the ``weights`` components (every config is written). Kept as it is if already complete."""
    done = folder / ".written.json"
    if done.is_file() and set(json.loads(done.read_text())) >= set(weights):
        return folder
    pipeline = _meta_pipeline(model)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.save_config(folder)  # model_index.json
    pipeline.tokenizer.save_pretrained(folder / "tokenizer")
    pipeline.scheduler.save_pretrained(folder / "scheduler")
    for name in COMPONENTS:
        module = getattr(pipeline, name)
        (folder / name).mkdir(exist_ok=True)
        if name == "text_encoder":
            module.config.save_pretrained(folder / name)
        else:
            module.save_config(folder / name)
        if name in weights:
            _write_constant_shards(module, folder / name, _STEMS[name])
    done.write_text(json.dumps(sorted(weights)))
    return folder


def _meta_pipeline(model: str) -> Any:
    if model != SMOKE:
        return build_random_pipeline(model, device="meta")
    pipeline: Any = build_tiny_pipeline()
    config = Qwen3Config(
        **{
            **TEXT_ENCODER_CONFIGS["klein-4b"],
            "hidden_size": TEXT_HIDDEN_SIZE,  # the tiny transformer stacks 3 x 16
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "vocab_size": len(pipeline.tokenizer),
        }
    )
    with torch.device("meta"):
        pipeline.text_encoder = Qwen3ForCausalLM(config)
    return pipeline


def _write_constant_shards(module: torch.nn.Module, component: Path, stem: str) -> None:
    """``module``'s state dict as bf16 ones in shards of at most ``SHARD_BYTES``, with an index
    when there is more than one, in the order ``save_pretrained`` writes (sorted names)."""
    shapes = {name: tensor.shape for name, tensor in module.state_dict().items()}
    if getattr(getattr(module, "config", None), "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)  # a tied head is not in the files
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(shapes):
        nbytes = shapes[name].numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        files = [f"{stem}.safetensors"]
    else:
        files = [f"{stem}-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)]
    weight_map = {}
    for file_name, names in zip(files, shards, strict=True):
        tensors = {name: torch.ones(shapes[name], dtype=torch.bfloat16) for name in names}
        save_file(tensors, component / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
        del tensors
    if len(shards) > 1:
        total = sum(shape.numel() * 2 for shape in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (component / f"{stem}.safetensors.index.json").write_text(json.dumps(index))
