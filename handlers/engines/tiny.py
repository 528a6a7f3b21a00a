"""A tiny random-weight FLUX.2-klein pipeline, built in-process with no download.

It uses the very classes of the real model (``Flux2Transformer2DModel``, ``Qwen3ForCausalLM``,
``AutoencoderKLFlux2``, ``FlowMatchEulerDiscreteScheduler``, ``Qwen2TokenizerFast``) with small
configs, so demo and tests drive the same engine code on a CPU in about a second. It is not a
mock: only the sizes differ. Shapes follow diffusers' ``get_dummy_components`` for Flux2Klein,
except that the VAE keeps four down blocks (``vae_scale_factor`` 8, like the real model) so a
256x256 image maps to a 16x16 token grid instead of a full-resolution latent.
"""

from __future__ import annotations

import json

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

# Text-encoder geometry. The real klein stacks layers (9, 18, 27) of a 36-layer Qwen3; the tiny
# encoder has 3 layers and stacks all of them (hidden_states[0] is the embedding output).
TEXT_HIDDEN_SIZE = 16
TEXT_NUM_LAYERS = 3
TINY_TEXT_ENCODER_OUT_LAYERS: tuple[int, ...] = (1, 2, 3)
# Prompts are padded to this many tokens (512 for the real model); 64 keeps CPU runs cheap.
TINY_MAX_SEQUENCE_LENGTH = 64
# VAE latent channels; the 2x2 patchify makes the transformer input 4x this (real: 32 -> 128).
LATENT_CHANNELS = 4
# Default init leaves the transformer's modulation gates near zero, so the prompt and the
# reference images would move the tiny model's output by less than one 8-bit level; a gain of 3 on
# its weight matrices makes both visibly change the image, as they do with real weights.
TRANSFORMER_WEIGHT_GAIN = 3.0
# Byte-level BPE size: 256 byte symbols + a few merges + the chat specials.
TOKENIZER_VOCAB_SIZE = 384

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# The Qwen3 chat template reduced to what diffusers uses: user/assistant turns, a generation
# prompt, and the empty think block that ``enable_thinking=False`` inserts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# A few sentences to learn merges from; content is irrelevant, only determinism matters.
_CORPUS = [
    "A hero enters a dark castle at night, holding a torch.",
    "The treasure room glitters with gold coins and ancient swords.",
    "a small cactus with a happy face in the sahara desert",
    "A cat holding a sign that says hello world.",
    "portrait photo of an old fisherman, dramatic lighting, 85mm",
    "<|im_start|>user\nScene 1: a red car on a wet street<|im_end|>\n<|im_start|>assistant\n",
]


def build_tiny_tokenizer() -> Qwen2TokenizerFast:
    """A byte-level BPE trained on a few sentences, wrapped as a Qwen tokenizer with a chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    vocab = bpe.get_vocab(with_added_tokens=True)
    merges = _merges_of(bpe)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=TINY_MAX_SEQUENCE_LENGTH,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _merges_of(bpe: Tokenizer) -> list[tuple[str, str]]:
    """A trained BPE's merges in learning order (``tokenizers`` exposes them only as JSON)."""
    merges = json.loads(bpe.to_str())["model"]["merges"]
    # Older tokenizers releases write "left right" strings, newer ones [left, right] pairs.
    pairs = (m.split(" ", 1) if isinstance(m, str) else m for m in merges)
    return [(str(left), str(right)) for left, right in pairs]


def _amplify(module: torch.nn.Module, gain: float) -> None:
    """Scale every weight matrix of ``module`` by ``gain`` (norm scales and biases untouched)."""
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim >= 2:
                param.mul_(gain)


def build_tiny_pipeline(seed: int = 0) -> Flux2KleinPipeline:
    """Build the tiny pipeline in float32 on the CPU; the same ``seed`` gives the same weights."""
    tokenizer = build_tiny_tokenizer()
    num_out_layers = len(TINY_TEXT_ENCODER_OUT_LAYERS)

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN_SIZE * num_out_layers,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )

    text_config = Qwen3Config(
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=32,
        num_hidden_layers=TEXT_NUM_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=len(tokenizer),
        max_position_embeddings=TINY_MAX_SEQUENCE_LENGTH * 4,
        tie_word_embeddings=True,
    )
    _amplify(transformer, TRANSFORMER_WEIGHT_GAIN)

    torch.manual_seed(seed + 1)
    text_encoder = Qwen3ForCausalLM(text_config).eval()

    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=256,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )

    # The real checkpoints' scheduler: resolution-dependent shifting (the pipeline passes ``mu``).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True
    )
    pipeline = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        is_distilled=True,
    )
    return pipeline
