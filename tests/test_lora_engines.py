"""LoRA on each kind of transformer the worker builds: eager, compiled (hotswap slots),
torchao-quantized, nunchaku. Engine-level: the queue path is covered by test_lora.py."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from handlers.engines.klein import KleinEngine
from handlers.engines.klein_loader import build_engine
from handlers.engines.lora import LoraAdapters, create_lora_adapters
from handlers.engines.speed import compile_transformer
from handlers.engines.tiny import build_tiny_pipeline
from handlers.errors import InvalidInput
from handlers.lora_files import AdapterFile
from tests.lora_files import make_adapter

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[AdapterFile]:
    """Two adapters: rank 4 (alpha 8) and rank 8 (alpha 8), as a job would hand them over."""
    folder = tmp_path_factory.mktemp("adapters")
    found = []
    for seed, rank in ((1, 4), (2, 8)):
        data = make_adapter(folder, seed=seed, rank=rank)
        path = folder / f"{seed}.safetensors"
        path.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        found.append(AdapterFile(path=path, sha256=sha, scale=0.8, field=f"input.loras[{seed - 1}]"))
    return found


def _image(engine: KleinEngine, files: list[AdapterFile] | None = None) -> np.ndarray:
    assert engine.loras is not None
    with engine.loras.applied(files or []):
        (image,) = engine.generate(
            prompts=["a cat"],
            seeds=[3],
            references=[],
            width=256,
            height=256,
            num_steps=2,
            guidance_scale=1.0,
        )
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def eager() -> KleinEngine:
    return build_engine(build_tiny_pipeline(), name="eager", device=CPU, max_loras=2)


def test_compiled_transformer_swaps_adapters_without_recompiling(eager: KleinEngine, files) -> None:
    """TORCH_COMPILE compiles only on CUDA, so the compiled path is built by hand here: hotswap
    slots, then the same regional compile with dynamo's eager backend (it traces, guards and
    would recompile exactly like inductor, minus the kernel build). After the first call any
    recompile is an error."""
    pipeline = build_tiny_pipeline()
    engine = build_engine(pipeline, name="compiled", device=CPU, max_loras=0)
    engine.loras = create_lora_adapters(pipeline, quantization="none", max_loras=2, max_rank=16, hotswap=True)
    compile_transformer(pipeline.transformer, backend="eager")
    base = _image(engine)  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        one = _image(engine, files[:1])
        two = _image(engine, files[1:])
        both = _image(engine, files)
        after = _image(engine)
    assert np.array_equal(base, _image(eager))  # zero slots add exactly nothing
    assert np.array_equal(after, base)
    # The same images as diffusers' plain load/set_adapters, up to float rounding (the scale is
    # folded into the weights instead of multiplying the output).
    for swapped, chosen in ((one, files[:1]), (two, files[1:]), (both, files)):
        assert np.abs(swapped - base).mean() > 2
        assert np.abs(swapped - _image(eager, chosen)).max() <= 2


def test_compiled_worker_refuses_an_adapter_above_its_slot_rank(files) -> None:
    pipeline = build_tiny_pipeline()
    adapters = create_lora_adapters(pipeline, quantization="none", max_loras=1, max_rank=4, hotswap=True)
    assert adapters is not None
    adapters.read(files[:1])  # rank 4 fits
    with pytest.raises(InvalidInput, match=r"^input\.loras\[1\]: rank 8 .* LORA_MAX_RANK=4"):
        adapters.read(files[1:])


@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_torchao_quantized_transformer_takes_adapters(files, quantization: str) -> None:
    """peft wraps torchao's quantized Linear weights (TorchaoLoraLinear): the adapter must show."""
    engine = build_engine(
        build_tiny_pipeline(), name=quantization, device=CPU, quantization=quantization, max_loras=2
    )
    base = _image(engine)
    styled = _image(engine, files[:1])
    assert np.abs(styled - base).mean() > 2
    assert np.array_equal(_image(engine), base)


def test_nunchaku_transformer_refuses_adapters_as_invalid_input(files) -> None:
    adapters = create_lora_adapters(
        build_tiny_pipeline(), quantization="nunchaku-int4", max_loras=2, max_rank=64, hotswap=False
    )
    assert isinstance(adapters, LoraAdapters)
    with pytest.raises(
        InvalidInput, match=r"^input\.loras\[0\]: the nunchaku-int4 transformer .* cannot take"
    ):
        adapters.read(files[:1])
    assert adapters.read([]) == []  # a job without adapters runs as before


def test_no_adapter_handling_when_max_loras_is_zero(tmp_path: Path) -> None:
    assert (
        create_lora_adapters(
            build_tiny_pipeline(), quantization="none", max_loras=0, max_rank=64, hotswap=True
        )
        is None
    )


def test_loaded_adapters_beyond_the_resident_limit_are_unloaded(files, monkeypatch) -> None:
    monkeypatch.setattr("handlers.engines.lora.MAX_RESIDENT", 1)
    engine = build_engine(build_tiny_pipeline(), name="evicting", device=CPU, max_loras=2)
    assert engine.loras is not None
    base = _image(engine)
    first = _image(engine, files[:1])
    _image(engine, files[1:])  # loading the second unloads the first
    assert len(engine.pipeline.get_list_adapters()["transformer"]) == 1
    assert np.array_equal(_image(engine, files[:1]), first)  # reloaded, same result
    assert np.array_equal(_image(engine), base)


def test_the_same_adapter_twice_in_a_job_adds_its_scales(eager: KleinEngine, files) -> None:
    half = dataclasses.replace(files[0], scale=0.4)
    assert np.abs(_image(eager, [half, half]) - _image(eager, files[:1])).max() <= 1  # 0.4 + 0.4 = 0.8
