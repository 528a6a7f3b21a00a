"""The klein engine on the tiny random-weight pipeline: sizes, seeds, batches, references, loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.engines.klein import REAL_MAX_SEQUENCE_LENGTH, REAL_TEXT_ENCODER_OUT_LAYERS, KleinEngine
from handlers.engines.klein_loader import create_klein_engine, load_pipeline
from handlers.engines.quantize import UnsupportedQuantization
from handlers.engines.tiny import (
    TINY_MAX_SEQUENCE_LENGTH,
    TINY_TEXT_ENCODER_OUT_LAYERS,
    build_tiny_pipeline,
    build_tiny_tokenizer,
)
from handlers.errors import InvalidInput

SIZE = 256


@pytest.fixture(scope="module")
def engine() -> KleinEngine:
    return create_klein_engine(model="tiny")


def _gen(engine: KleinEngine, prompts: list[str], seeds: list[int], **kw: object) -> list[np.ndarray]:
    args: dict = {"references": [], "width": SIZE, "height": SIZE, "num_steps": 2, "guidance_scale": 1.0}
    args.update(kw)
    return [np.asarray(im, dtype=np.int16) for im in engine.generate(prompts=prompts, seeds=seeds, **args)]


def _noise_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_tiny_engine_identity(engine: KleinEngine) -> None:
    assert engine.name == "flux2-klein-tiny"
    assert engine.device == torch.device("cpu")
    assert engine.text_encoder_out_layers == TINY_TEXT_ENCODER_OUT_LAYERS
    assert engine.max_sequence_length == TINY_MAX_SEQUENCE_LENGTH
    # Same VAE downsampling as the real model, so sizes behave the same.
    assert engine.pipeline.vae_scale_factor == 8
    assert engine.size_multiple == 16


@pytest.mark.parametrize(("width", "height"), [(256, 256), (256, 320), (320, 256)])
def test_generates_exactly_the_requested_size(engine: KleinEngine, width: int, height: int) -> None:
    images = engine.generate(
        prompts=["a castle"],
        seeds=[1],
        references=[],
        width=width,
        height=height,
        num_steps=1,
        guidance_scale=1.0,
    )
    assert len(images) == 1
    assert images[0].size == (width, height)
    assert images[0].mode == "RGB"


def test_same_seed_same_image_other_seed_other_image(engine: KleinEngine) -> None:
    first = _gen(engine, ["a red car"], [7])[0]
    again = _gen(engine, ["a red car"], [7])[0]
    other = _gen(engine, ["a red car"], [8])[0]
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 5
    assert first.std() > 5  # not a flat image


def test_prompt_changes_the_image(engine: KleinEngine) -> None:
    dog = _gen(engine, ["a dog"], [3])[0]
    ship = _gen(engine, ["a sailing ship at dawn over a calm sea"], [3])[0]
    assert np.abs(dog - ship).max() > 10


def test_batch_gives_distinct_images_that_match_single_runs(engine: KleinEngine) -> None:
    batch = _gen(engine, ["scene one: a hero", "scene two: a treasure room"], [42, 43])
    assert len(batch) == 2
    assert np.abs(batch[0] - batch[1]).mean() > 5
    alone = [
        _gen(engine, ["scene one: a hero"], [42])[0],
        _gen(engine, ["scene two: a treasure room"], [43])[0],
    ]
    for single, batched in zip(alone, batch, strict=True):
        # Per-item determinism holds up to float rounding of batched kernels: at most a level or two.
        diff = np.abs(single - batched)
        assert diff.max() <= 2
        assert diff.mean() < 0.05


def test_batch_of_one_prompt_twice_with_two_seeds(engine: KleinEngine) -> None:
    images = _gen(engine, ["same prompt", "same prompt"], [1, 2])
    assert np.abs(images[0] - images[1]).mean() > 5


def test_references_are_accepted_and_change_the_output(engine: KleinEngine) -> None:
    plain = _gen(engine, ["a knight"], [5])[0]
    one_ref = _gen(engine, ["a knight"], [5], references=[_noise_image(96, 64, 1)])[0]
    two_refs = _gen(
        engine,
        ["a knight", "a dragon"],
        [5, 6],
        references=[_noise_image(96, 64, 1), _noise_image(64, 80, 2)],
    )
    assert one_ref.shape == plain.shape == two_refs[0].shape
    assert np.abs(one_ref - plain).max() > 10
    assert np.abs(two_refs[0] - one_ref).max() > 10
    assert np.abs(two_refs[0] - two_refs[1]).mean() > 5


def test_non_rgb_reference_is_converted(engine: KleinEngine) -> None:
    grey = _noise_image(64, 64, 3).convert("L")
    rgba = _noise_image(64, 64, 4).convert("RGBA")
    images = _gen(engine, ["x"], [1], references=[grey, rgba])
    assert images[0].shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize(
    ("size", "message"), [((48, 64), "at least 64"), ((600, 64), "aspect ratio"), ((64, 40), "at least 64")]
)
def test_unusable_reference_is_invalid_input_naming_it(
    engine: KleinEngine, size: tuple[int, int], message: str
) -> None:
    refs = [_noise_image(64, 64, 1), _noise_image(*size, 2)]
    with pytest.raises(InvalidInput, match=rf"images\[1\].*{message}"):
        engine.generate(
            prompts=["x"],
            seeds=[1],
            references=refs,
            width=SIZE,
            height=SIZE,
            num_steps=1,
            guidance_scale=1.0,
        )


def test_size_not_multiple_of_16_is_invalid_input(engine: KleinEngine) -> None:
    with pytest.raises(InvalidInput, match="multiple of 16"):
        engine.generate(
            prompts=["x"], seeds=[1], references=[], width=264, height=256, num_steps=1, guidance_scale=1
        )


def test_prompts_and_seeds_must_pair(engine: KleinEngine) -> None:
    with pytest.raises(ValueError, match="one seed per prompt"):
        engine.generate(
            prompts=["a", "b"],
            seeds=[1],
            references=[],
            width=SIZE,
            height=SIZE,
            num_steps=1,
            guidance_scale=1,
        )


def test_guidance_is_ignored_by_the_distilled_model(engine: KleinEngine) -> None:
    assert engine.is_distilled
    plain = _gen(engine, ["a lighthouse"], [9])[0]
    guided = _gen(engine, ["a lighthouse"], [9], guidance_scale=4.0)[0]
    assert np.array_equal(plain, guided)


def test_out_of_memory_propagates_unchanged(engine: KleinEngine) -> None:
    # A real torch OOM raised from inside the real transformer: the engine must not wrap it, the
    # handler maps exactly this type to ``out_of_memory``.
    def exhausted(*_: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    handle = engine.pipeline.transformer.register_forward_pre_hook(exhausted)
    try:
        with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
            _gen(engine, ["x"], [1])
    finally:
        handle.remove()
    engine.free_memory()
    assert _gen(engine, ["x"], [1])[0].shape == (SIZE, SIZE, 3)  # still usable afterwards


def test_warm_up_and_free_memory_run(engine: KleinEngine) -> None:
    engine.warm_up()
    engine.free_memory()


def test_tokenizer_chat_template_and_padding() -> None:
    tokenizer = build_tiny_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a dog"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text == "<|im_start|>user\na dog<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    encoded = tokenizer(text, padding="max_length", truncation=True, max_length=TINY_MAX_SEQUENCE_LENGTH)
    assert len(encoded["input_ids"]) == TINY_MAX_SEQUENCE_LENGTH
    assert encoded["input_ids"][-1] == tokenizer.pad_token_id
    assert tokenizer.decode(tokenizer("hello world")["input_ids"]) == "hello world"
    # Built the same way twice, it is the same tokenizer (the BPE training is deterministic).
    assert build_tiny_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tiny_weights_depend_only_on_the_seed() -> None:
    a = build_tiny_pipeline(seed=0).transformer.state_dict()
    b = build_tiny_pipeline(seed=0).transformer.state_dict()
    c = build_tiny_pipeline(seed=1).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("klein-tiny")
    build_tiny_pipeline().save_pretrained(folder)
    return folder


def test_loads_a_local_diffusers_folder_as_a_real_variant(engine: KleinEngine, saved_tiny: Path) -> None:
    local = create_klein_engine(
        model="klein-4b", model_path=str(saved_tiny), device="cpu", dtype=torch.float32
    )
    assert local.name == "flux2-klein-4b-fp32"
    # Its 3-layer text encoder cannot give layers (9, 18, 27): the engine stacks what the model has.
    assert local.text_encoder_out_layers == TINY_TEXT_ENCODER_OUT_LAYERS
    assert local.max_sequence_length == TINY_MAX_SEQUENCE_LENGTH
    loaded = _gen(local, ["a red car"], [7])[0]
    assert np.array_equal(loaded, _gen(engine, ["a red car"], [7])[0])


def test_load_pipeline_keeps_tokenizer_and_config(saved_tiny: Path) -> None:
    pipeline = load_pipeline(str(saved_tiny), torch_dtype=torch.float32)
    assert pipeline.tokenizer.chat_template is not None
    assert pipeline.tokenizer.pad_token == "<|endoftext|>"
    assert pipeline.config.is_distilled is True
    assert pipeline.vae_scale_factor == 8


def test_real_prompt_settings_are_the_official_ones() -> None:
    assert REAL_TEXT_ENCODER_OUT_LAYERS == (9, 18, 27)
    assert REAL_MAX_SEQUENCE_LENGTH == 512


def test_quantization_and_model_errors_are_clear() -> None:
    # nunchaku is not installed here: refused before any weight loads (the path does not exist).
    with pytest.raises(UnsupportedQuantization, match="nunchaku is not installed.*NUNCHAKU_WHEEL_URL"):
        create_klein_engine(model="klein-4b", model_path="/nonexistent", quantization="nunchaku-int4")
    with pytest.raises(ValueError, match="unknown quantization"):
        create_klein_engine(model="tiny", quantization="int3")
    with pytest.raises(ValueError, match="unknown model"):
        create_klein_engine(model="klein-99b")
    with pytest.raises(ValueError, match="resolved"):
        create_klein_engine(model="klein-4b", model_path="/nonexistent", quantization="auto")


def test_importing_the_engines_package_does_not_import_torch() -> None:
    code = "import sys, handlers.engines; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
