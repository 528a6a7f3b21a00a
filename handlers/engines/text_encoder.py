"""klein's text encoder, kept to the layers its prompt embeddings use.

The official checkpoints stack hidden states (9, 18, 27) of a 36-layer Qwen3
(``klein_facts.text_encoder.stacked_layers``).
Layers 28..36 and the 151936-wide ``lm_head`` never shape an image, yet diffusers reads and runs
them: on 512 tokens per prompt, for every job.

- ``load_text_encoder`` reads the text encoder already cut: its config is cut to the last used layer
  before transformers builds the model, so the dropped layers are not read from disk.
  transformers maps safetensors files and reads a tensor only when it is touched; loaded whole,
  much of the dropped layers is read by the load before the cut (read-ahead around what it
  touches). Measured from a cold page cache (BENCHMARKS.md, "Reading the text encoder cut"):
  Qwen3-4B 7.01 -> 6.29 GB read, Qwen3-8B 12.60 -> 11.77 GB.
- ``truncate_text_encoder`` cuts a text encoder that was built or loaded whole (the tiny model,
  the benchmarks' random-weights models), and drops the head (``lm_head``) of either: the engine
  keeps the base model, which returns hidden states without logits for all 512 tokens.

Both give ``hidden_states[k]`` bit-identical to the full model's for every ``k <= last_layer``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from klein_facts.text_encoder import cut_off, stacked_layers

logger = logging.getLogger(__name__)


def truncate_text_encoder(text_encoder: Any, last_layer: int) -> Any:
    """The text encoder's base model with layers 1..``last_layer`` only, and no ``lm_head``.

    Returns the base ``Qwen3Model`` (``text_encoder.base_model``): it takes the very call the
    pipeline makes (``input_ids``, ``attention_mask``, ``output_hidden_states``, ``use_cache``) and
    returns ``.hidden_states``, without computing logits for all 512 tokens. A text encoder
    ``load_text_encoder`` read cut already has ``last_layer`` layers and is returned as it is.
    """
    base = text_encoder.base_model
    total = base.config.num_hidden_layers
    if not 1 <= last_layer <= total:
        raise ValueError(f"last_layer {last_layer} is outside the text encoder's 1..{total} layers")
    if last_layer < total:
        base.layers = base.layers[:last_layer]
        _cut_config(base.config, last_layer)
        _drop_final_norm(base)
    logger.info("text encoder: %d of %d layers kept, lm_head dropped", last_layer, total)
    return base


def load_text_encoder(
    source: str,
    *,
    joint_attention_dim: int,
    torch_dtype: torch.dtype,
    token: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> Any:
    """``source``'s ``text_encoder`` (a hub id or a diffusers folder) with only the layers up to the
    last one ``stacked_layers`` uses read and built. Its class is the pipeline's
    (``Qwen3ForCausalLM``); an untied head is mapped, never read: the engine drops it unused.

    A tensor missing from the files is a ``ValueError`` naming it (whole, transformers would leave
    it randomly initialised with a warning), so a partial folder stops the boot.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    hub = {"token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
    config = AutoConfig.from_pretrained(source, subfolder="text_encoder", **hub)
    total = config.num_hidden_layers
    last = max(
        stacked_layers(
            num_layers=total, hidden_size=config.hidden_size, joint_attention_dim=joint_attention_dim
        )
    )
    _cut_config(config, last)
    with _without_load_report():  # 9 layers "unexpected", by design: checked below instead
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            source,
            subfolder="text_encoder",
            config=config,
            dtype=torch_dtype,
            output_loading_info=True,
            **hub,
        )
    model, info = loaded
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"the text encoder's weights in {source} lack {len(missing)} tensors: {missing[:3]}")
    unused = [key for key in info["unexpected_keys"] if not cut_off(key, last)]
    if unused:
        logger.warning("text encoder: %d tensors in %s fit no layer: %s", len(unused), source, unused[:3])
    if last < total:
        _drop_final_norm(model.base_model)
    logger.info("text encoder: read %d of %d layers", last, total)
    return model.eval()


def _cut_config(config: Any, last_layer: int) -> None:
    config.num_hidden_layers = last_layer
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:  # one entry per layer, validated against num_hidden_layers
        config.layer_types = list(layer_types)[:last_layer]


def _drop_final_norm(base: Any) -> None:
    """transformers replaces the last entry of ``hidden_states`` with ``last_hidden_state``, which
    is *after* the final RMSNorm. In the full model ``hidden_states[27]`` is the raw output of
    layer 27; cut after layer 27, that same entry would come out normed, so the norm goes. A model
    that keeps every layer keeps its norm: the full model's last entry is normed too."""
    base.norm = torch.nn.Identity()


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _without_load_report() -> Iterator[None]:
    """transformers logs a table of every unexpected tensor as a warning: for a cut load, every
    dropped one, on every boot. ``load_text_encoder`` checks the same lists and says what matters."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    report_logger.addFilter(report_filter)
    try:
        yield
    finally:
        report_logger.removeFilter(report_filter)
