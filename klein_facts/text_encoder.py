"""Which of the text encoder's layers klein uses: torch-free, for the engine that cuts the model and
for the boot step that reads its files ahead (``worker.prefetch``), which runs before torch imports."""

from __future__ import annotations

import re

# The official prompt embedding: Qwen3 layers 9, 18, 27 stacked.
REAL_TEXT_ENCODER_OUT_LAYERS: tuple[int, ...] = (9, 18, 27)

_LAYER_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def stacked_layers(*, num_layers: int, hidden_size: int, joint_attention_dim: int) -> tuple[int, ...]:
    """The text-encoder layers whose hidden states the transformer reads, stacked.

    The official checkpoints stack layers (9, 18, 27) of a 36-layer Qwen3. A smaller text encoder
    (the tiny model saved to a folder) cannot have those, so it stacks its last N layers, N being
    what the transformer's ``joint_attention_dim`` expects.
    """
    num_stacked = joint_attention_dim // hidden_size
    if num_stacked == len(REAL_TEXT_ENCODER_OUT_LAYERS) and num_layers >= max(REAL_TEXT_ENCODER_OUT_LAYERS):
        return REAL_TEXT_ENCODER_OUT_LAYERS
    return tuple(range(num_layers - num_stacked + 1, num_layers + 1))


def cut_off(tensor_name: str, last_layer: int) -> bool:
    """Whether a checkpoint tensor belongs to a decoder layer after ``last_layer`` (1-based), which a
    text encoder cut there has no place for: ``model.layers.27.mlp...`` is layer 28. The embeddings,
    the final norm and the head belong to no layer."""
    match = _LAYER_KEY.match(tensor_name)
    return match is not None and int(match.group(1)) >= last_layer
