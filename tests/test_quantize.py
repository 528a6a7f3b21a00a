"""Quantization: the config each card gets, torchao on the tiny pipeline (CPU), nunchaku refusals."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    PerRow,
)

from handlers.engines.klein import KleinEngine
from handlers.engines.klein_loader import create_klein_engine
from handlers.engines.quantize import (
    UnsupportedQuantization,
    check_nunchaku,
    fp8_config_for,
    nunchaku_problem,
    plan_for,
    quantizable,
    quantizer_for,
)

SIZE = 128


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0), (12, 0)])
def test_fp8_tensor_cores_get_dynamic_row_wise_fp8(capability: tuple[int, int]) -> None:
    config = fp8_config_for(capability)
    assert isinstance(config, Float8DynamicActivationFloat8WeightConfig)
    # Row-wise scales for activations and weights (torchao normalises the one given to a pair).
    assert all(isinstance(g, PerRow) for g in config.granularity)


@pytest.mark.parametrize("capability", [None, (7, 5), (8, 0), (8, 6), (8, 7)])
def test_cards_without_fp8_tensor_cores_get_weight_only_fp8(capability: tuple[int, int] | None) -> None:
    assert isinstance(fp8_config_for(capability), Float8WeightOnlyConfig)
    assert "slower" in plan_for("fp8", capability).note


def test_plans() -> None:
    fp8 = plan_for("fp8", (9, 0))
    assert fp8.note == ""
    assert isinstance(fp8.text_encoder, Float8WeightOnlyConfig)  # the text encoder: weights only
    int8 = plan_for("int8", (8, 0))
    assert isinstance(int8.transformer, Int8DynamicActivationInt8WeightConfig)
    assert isinstance(int8.text_encoder, Int8WeightOnlyConfig)
    with pytest.raises(ValueError, match="not a torchao quantization"):
        plan_for("nunchaku-int4", (8, 9))


def test_filter_takes_aligned_linears_only() -> None:
    assert quantizable(torch.nn.Linear(32, 48), "blocks.0.ff")
    assert not quantizable(torch.nn.Linear(30, 48), "blocks.0.ff")
    assert not quantizable(torch.nn.Linear(32, 40), "blocks.0.ff")
    assert not quantizable(torch.nn.Conv2d(16, 16, 3), "conv")
    assert not quantizable(torch.nn.Linear(32, 32), "proj_out", skip=("proj_out",))
    assert quantizable(torch.nn.Linear(32, 32), "blocks.0.proj_out_extra", skip=("proj_out",))


def test_quantizer_for_names() -> None:
    assert quantizer_for("none") is None
    assert callable(quantizer_for("int8"))
    with pytest.raises(ValueError, match="resolved"):
        quantizer_for("auto")
    with pytest.raises(ValueError, match="unknown quantization"):
        quantizer_for("int3")


def _image(engine: KleinEngine, seed: int = 3) -> np.ndarray:
    (image,) = engine.generate(
        prompts=["a red car"],
        seeds=[seed],
        references=[],
        width=SIZE,
        height=SIZE + 32,
        num_steps=1,
        guidance_scale=1.0,
    )
    assert image.size == (SIZE, SIZE + 32)
    return np.asarray(image, dtype=np.int16)


def _weight_types(module: torch.nn.Module) -> dict[str, str]:
    return {
        name: type(sub.weight).__name__
        for name, sub in module.named_modules()
        if isinstance(sub, torch.nn.Linear)
    }


@pytest.fixture(scope="module")
def plain_image() -> np.ndarray:
    return _image(create_klein_engine(model="tiny"))


@pytest.mark.parametrize(("quantization", "tensor"), [("int8", "Int8Tensor"), ("fp8", "Float8Tensor")])
def test_torchao_on_the_tiny_pipeline_on_cpu(
    quantization: str, tensor: str, plain_image: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="handlers.engines.quantize"):
        engine = create_klein_engine(model="tiny", quantization=quantization)
    transformer = _weight_types(engine.pipeline.transformer)
    text_encoder = _weight_types(engine.pipeline.text_encoder)
    # Every aligned Linear is quantized except the transformer's input and output projections.
    assert transformer.pop("x_embedder") == transformer.pop("proj_out") == "Parameter"
    assert set(transformer.values()) == {tensor}
    assert set(text_encoder.values()) == {tensor}
    if quantization == "fp8":  # a CPU has no FP8 tensor cores: weight-only, with a warning
        assert "saves memory but runs slower" in caplog.text
    image = _image(engine)
    assert image.std() > 5
    # Close to the float32 image, not equal: the weights really are rounded.
    diff = np.abs(image - plain_image)
    assert 0 < diff.mean() < 20


def test_nunchaku_missing_is_a_clear_error_before_loading() -> None:
    assert importlib.util.find_spec("nunchaku") is None
    for quantization in ("nunchaku-int4", "nunchaku-fp4"):
        with pytest.raises(UnsupportedQuantization, match="nunchaku is not installed") as info:
            create_klein_engine(model="klein-9b", model_path="/nonexistent", quantization=quantization)
        assert "NUNCHAKU_WHEEL_URL" in str(info.value)
        assert "Hopper" in str(info.value)


@pytest.mark.parametrize(
    ("quantization", "capability", "problem"),
    [
        ("nunchaku-int4", (9, 0), "Hopper"),
        ("nunchaku-int4", (12, 0), "sm_120"),
        ("nunchaku-fp4", (8, 9), "sm_89"),
        ("nunchaku-int4", None, "needs an NVIDIA GPU"),
        ("nunchaku-int4", (8, 9), None),
        ("nunchaku-int4", (8, 6), None),
        ("nunchaku-fp4", (12, 0), None),
    ],
)
def test_nunchaku_card_support(
    quantization: str, capability: tuple[int, int] | None, problem: str | None
) -> None:
    found = nunchaku_problem(quantization, capability)
    assert found == problem if problem is None else problem in found


@pytest.fixture
def fake_nunchaku(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable third-party ``nunchaku`` without FLUX.2 support (like today's releases)."""
    package = tmp_path / "nunchaku"
    package.mkdir()
    (package / "__init__.py").write_text('__version__ = "1.0.0"\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield package
    sys.modules.pop("nunchaku", None)


def test_installed_nunchaku_without_flux2_support_is_refused(fake_nunchaku: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedQuantization, match="Hopper"):
        check_nunchaku("nunchaku-int4", capability=(9, 0), transformer_path=None)
    with pytest.raises(UnsupportedQuantization, match="no official FLUX.2 support"):
        check_nunchaku("nunchaku-int4", capability=(8, 9), transformer_path=None)
    with pytest.raises(UnsupportedQuantization, match="nunchaku 1.0.0 has no FLUX.2 transformer"):
        check_nunchaku("nunchaku-int4", capability=(8, 9), transformer_path=str(tmp_path))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quantization", ["fp8", "int8"])
def test_torchao_on_the_tiny_pipeline_on_cuda(quantization: str) -> None:
    engine = create_klein_engine(model="tiny", device="cuda", dtype=torch.bfloat16, quantization=quantization)
    engine.warm_up()
    assert _image(engine).std() > 5
