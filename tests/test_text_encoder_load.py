"""The text encoder read cut from a diffusers folder (MODEL_PATH): a 30-layer Qwen3 stacking layers
(9, 18, 27) like the official checkpoints, so layers 28..30 and the untied ``lm_head`` are what the
cut leaves out. Plain diffusers, loading it whole, is the reference the embeddings must match."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline
from safetensors.torch import load_file, save_file

from handlers.engines.klein_loader import create_klein_engine
from handlers.engines.text_encoder import load_text_encoder
from handlers.engines.tiny import TEXT_HIDDEN_SIZE
from tests.production import deep_tiny_pipeline

DEPTH = 30
PROMPTS = ["a red car", "a lighthouse at dusk, oil on canvas"]


def _deep_folder(folder: Path) -> Path:
    deep_tiny_pipeline(DEPTH).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def deep_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _deep_folder(tmp_path_factory.mktemp("klein-deep"))


def _weights_file(folder: Path) -> Path:
    (weights,) = (folder / "text_encoder").glob("*.safetensors")
    return weights


def _rewrite_without(folder: Path, drop: callable) -> None:  # type: ignore[valid-type]
    weights = _weights_file(folder)
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if not drop(k)}, weights, metadata={"format": "pt"})


def _embeddings(pipeline: Flux2KleinPipeline) -> torch.Tensor:
    with torch.inference_mode():
        embeds, _ = pipeline.encode_prompt(
            prompt=PROMPTS,
            device=torch.device("cpu"),
            max_sequence_length=64,
            text_encoder_out_layers=(9, 18, 27),
        )
    return embeds


@pytest.fixture(scope="module")
def whole_embeddings(deep_folder: Path) -> torch.Tensor:
    # Plain diffusers, none of our code: every layer and the head read and run.
    plain = Flux2KleinPipeline.from_pretrained(deep_folder, dtype=torch.float32, local_files_only=True)
    assert plain.text_encoder.config.num_hidden_layers == DEPTH
    return _embeddings(plain)


def test_the_engine_reads_the_text_encoder_cut_and_embeds_prompts_bit_identically(
    deep_folder: Path, whole_embeddings: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        engine = create_klein_engine(
            model="klein-4b", model_path=str(deep_folder), device="cpu", dtype=torch.float32
        )
    text_encoder = engine.pipeline.text_encoder
    assert engine.text_encoder_out_layers == (9, 18, 27)
    assert len(text_encoder.layers) == text_encoder.config.num_hidden_layers == 27
    assert not any(name.startswith("lm_head") for name, _ in text_encoder.named_parameters())
    assert torch.equal(_embeddings(engine.pipeline), whole_embeddings)
    messages = [record.getMessage() for record in caplog.records]
    assert "text encoder: read 27 of 30 layers" in messages
    # The 3 layers left out on purpose are no warning table in every boot's log, and the class is
    # the one diffusers expects.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], messages


def test_a_folder_shipping_only_the_used_layers_loads_the_same(
    deep_folder: Path, whole_embeddings: torch.Tensor, tmp_path: Path
) -> None:
    # What the cut reads is all it needs: without layers 28..30 the files still serve.
    slim = _deep_folder(tmp_path / "slim")
    _rewrite_without(
        slim, lambda key: key.startswith(("model.layers.27.", "model.layers.28.", "model.layers.29."))
    )
    engine = create_klein_engine(model="klein-4b", model_path=str(slim), device="cpu", dtype=torch.float32)
    assert torch.equal(_embeddings(engine.pipeline), whole_embeddings)


def test_a_text_encoder_missing_a_used_tensor_is_refused_naming_it(tmp_path: Path) -> None:
    # Loaded whole, transformers would fill it with random numbers and warn: images silently wrong.
    broken = _deep_folder(tmp_path / "broken")
    _rewrite_without(broken, lambda key: key == "model.layers.12.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"lack 1 tensors: \['model\.layers\.12\.mlp\.up_proj\.weight'\]"):
        create_klein_engine(model="klein-4b", model_path=str(broken), device="cpu", dtype=torch.float32)


def test_tensors_that_fit_no_layer_are_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    odd = _deep_folder(tmp_path / "odd")
    weights = _weights_file(odd)
    tensors = load_file(weights)
    tensors["model.extra_adapter.weight"] = torch.zeros(2, 2)
    save_file(tensors, weights, metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        model = load_text_encoder(
            str(odd), joint_attention_dim=3 * TEXT_HIDDEN_SIZE, torch_dtype=torch.float32
        )
    assert len(model.base_model.layers) == 27
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 tensors" in warning and "extra_adapter" in warning
