"""Speed steps on the tiny model: truncation and fusion change no output, compilation traces whole,
and the GPU benchmark script still runs (its --smoke mode: same code, tiny model, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from handlers.engines.klein import to_pil
from handlers.engines.klein_loader import create_klein_engine, prompt_settings
from handlers.engines.speed import compile_pipeline, fuse_qkv
from handlers.engines.text_encoder import truncate_text_encoder
from handlers.engines.tiny import build_tiny_pipeline
from tests.helpers import load_script

SIZE = 128


def _encoder(num_layers: int = 5) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=200,
    )
    return Qwen3ForCausalLM(config).eval()


def _hidden_states(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded prompt, like the pipeline's max_length padding
    with torch.inference_mode():
        # The pipeline's very call (Flux2KleinPipeline._get_qwen3_prompt_embeds).
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states


def test_truncated_text_encoder_gives_bit_identical_hidden_states() -> None:
    full = _hidden_states(_encoder())
    truncated = truncate_text_encoder(_encoder(), 3)
    assert not hasattr(truncated, "lm_head")  # no logits over the vocabulary
    assert len(truncated.layers) == truncated.config.num_hidden_layers == 3
    assert isinstance(truncated.norm, torch.nn.Identity)
    cut = _hidden_states(truncated)
    assert len(cut) == 4
    # Index 3 included: it is the last entry, which transformers would have overwritten with the
    # final-normed state had the norm stayed.
    for k in range(4):
        assert torch.equal(cut[k], full[k]), k


def test_keeping_every_layer_keeps_the_final_norm() -> None:
    full = _hidden_states(_encoder(3))
    kept = truncate_text_encoder(_encoder(3), 3)
    assert not isinstance(kept.norm, torch.nn.Identity)
    # The full model's last entry is normed, so the "truncated" one must be too.
    assert all(torch.equal(a, b) for a, b in zip(_hidden_states(kept), full, strict=True))


def test_truncation_outside_the_layers_is_refused() -> None:
    for last in (0, 6):
        with pytest.raises(ValueError, match="outside"):
            truncate_text_encoder(_encoder(), last)


def _pipeline_image(pipeline: object, **kw: object) -> np.ndarray:
    layers, max_length = prompt_settings(pipeline)
    pipeline.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        out = pipeline(
            prompt=["a red car", "a blue boat"],
            width=SIZE,
            height=SIZE,
            num_inference_steps=2,
            guidance_scale=1.0,
            generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
            output_type="np",
            max_sequence_length=max_length,
            text_encoder_out_layers=layers,
            **kw,
        )
    return out.images


@pytest.fixture(scope="module")
def plain_images() -> np.ndarray:
    return _pipeline_image(build_tiny_pipeline())


def test_fused_qkv_changes_nothing_but_the_layout(plain_images: np.ndarray) -> None:
    pipeline = build_tiny_pipeline()
    fuse_qkv(pipeline.transformer)
    block = pipeline.transformer.transformer_blocks[0].attn
    assert block.fused_projections and hasattr(block, "to_qkv") and hasattr(block, "to_added_qkv")
    assert not hasattr(block, "to_q") and not hasattr(block, "add_q_proj")  # no duplicate weights
    np.testing.assert_allclose(_pipeline_image(pipeline), plain_images, atol=1e-5)


def test_engine_images_equal_the_plain_pipeline(plain_images: np.ndarray) -> None:
    engine = create_klein_engine(model="tiny")  # truncation and fusion applied
    assert not hasattr(engine.pipeline.text_encoder, "lm_head")
    images = engine.generate(
        prompts=["a red car", "a blue boat"],
        seeds=[7, 8],
        references=[],
        width=SIZE,
        height=SIZE,
        num_steps=2,
        guidance_scale=1.0,
    )
    plain = [np.asarray(image) for image in engine.pipeline.image_processor.numpy_to_pil(plain_images)]
    for image, expected in zip(images, plain, strict=True):
        assert np.abs(np.asarray(image, dtype=np.int16) - expected).max() <= 1


def test_compile_is_honoured_on_cpu() -> None:
    # TORCH_COMPILE=true on a CPU: inductor's C++ backend (what the compile-cache tests run on).
    # Compilation is lazy, so building the engine costs nothing more.
    engine = create_klein_engine(model="tiny", compile=True, compile_sizes=((1, 64, 64),))
    assert engine.compiled is True
    assert engine.compile_sizes == ((1, 64, 64),)


def test_regional_compilation_traces_whole_graphs(plain_images: np.ndarray) -> None:
    # backend="eager": dynamo traces with fullgraph=True (any graph break is an error) but nothing
    # is code-generated, so this checks the compiled path on a CPU in seconds.
    pipeline = build_tiny_pipeline()
    fuse_qkv(pipeline.transformer)
    compile_pipeline(pipeline, backend="eager")
    np.testing.assert_allclose(_pipeline_image(pipeline), plain_images, atol=1e-5)


def test_after_warm_up_no_job_shape_compiles_anything() -> None:
    # The warm-up compiles the served sizes only; then dynamo's stance makes any other shape run
    # eager, so no job stalls on a recompile. backend="eager" runs dynamo's tracing and guards,
    # which decide recompiles, without codegen.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    engine = create_klein_engine(model="tiny", compile_sizes=((1, 64, 64),))
    compile_pipeline(engine.pipeline, backend="eager")
    engine.compiled = True
    engine.warm_up()
    after_warm_up = counters["stats"]["unique_graphs"]
    assert after_warm_up > 0
    for batch, width, height in ((1, 64, 64), (2, 64, 64), (3, 96, 64), (1, 64, 128)):
        (image, *_) = engine.generate(
            prompts=["x"] * batch,
            seeds=list(range(batch)),
            references=[],
            width=width,
            height=height,
            num_steps=1,
            guidance_scale=1.0,
        )
        assert image.size == (width, height)
        assert counters["stats"]["unique_graphs"] == after_warm_up, f"compiled at {batch}x{width}x{height}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_tiny_engine_on_cuda() -> None:
    engine = create_klein_engine(model="tiny", device="cuda", dtype=torch.bfloat16, compile=True)
    assert engine.compiled
    engine.warm_up()
    (image,) = engine.generate(
        prompts=["x"], seeds=[1], references=[], width=256, height=320, num_steps=2, guidance_scale=1.0
    )
    assert image.size == (256, 320)


def test_gpu_benchmark_script_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process (the script's own main) to skip a second torch import; the smoke mode runs the
    # very functions a GPU run does, on the tiny model.
    bench = load_script("bench_gpu")
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--attention-backend", "native", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [stage["stage"] for stage in report["stages"]] == ["plain", "engine none"]
    assert report["args"]["attention_backend"] == "native"  # both stages ran with it
    for stage in report["stages"]:
        assert stage["s_per_image"] > 0 and stage["images_per_s"] > 0
        assert stage["graphs_compiled_during_runs"] == 0
        # Where one image's time went: each model timed around its own calls, the rest is "post".
        parts = stage["stages_s"]
        assert set(parts) == {"text_encoder", "denoise", "vae_decode", "post", "total"}
        assert all(parts[name] > 0 for name in ("text_encoder", "denoise", "vae_decode"))
        assert sum(
            parts[name] for name in ("text_encoder", "denoise", "vae_decode", "post")
        ) == pytest.approx(parts["total"], rel=0.05)
    assert [row["tile"] for row in report["upscale_x4"]] == [32, None]
    assert report["args"]["model"] == "tiny"
    assert "| engine none |" in capsys.readouterr().out  # the markdown table


def test_gpu_benchmark_compiled_stage_traces_on_the_cpu(tmp_path: Path) -> None:
    # The compiled stage with dynamo's eager backend: the code path a GPU run takes, with the
    # boot cost split in two. (Whether the 64 px smoke shapes recompile depends on the CPU's
    # convolution-backend guards, so only the count's presence is checked here.)
    bench = load_script("bench_gpu")
    out = tmp_path / "bench.json"
    assert (
        bench.main(
            ["--smoke", "--compile-backend", "eager", "--skip-plain", "--skip-upscale", "--json", str(out)]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert [stage["stage"] for stage in report["stages"]] == ["engine none", "compiled none"]
    assert report["compile_warmup_transformer_s"] > 0 and report["compile_warmup_vae_s"] > 0
    assert report["compile_warmup_s"] == pytest.approx(
        report["compile_warmup_transformer_s"] + report["compile_warmup_vae_s"]
    )
    assert isinstance(report["stages"][1]["graphs_compiled_during_runs"], int)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_device_side_pil_conversion_is_bit_identical_to_diffusers(dtype: torch.dtype) -> None:
    from diffusers.image_processor import VaeImageProcessor

    images = torch.rand(2, 3, 96, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    images[0, :, 0, :4] = torch.tensor([0.0, 1.0, 0.5 / 255, 1.5 / 255])  # edges and exact halves
    ours = to_pil(images)
    theirs = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
    assert [image.size for image in ours] == [(64, 96), (64, 96)]
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.mode == reference.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(reference))


def test_gpu_benchmark_compiled_stage_through_the_compile_cache(tmp_path: Path, monkeypatch) -> None:
    # --compile-cache: the compiled stage runs the worker's boot step (lookup, compile, save).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # restored after the test
    bench = load_script("bench_gpu")
    out = tmp_path / "bench.json"
    argv = ["--smoke", "--compile-backend", "eager", "--skip-plain", "--skip-upscale"]
    assert bench.main([*argv, "--compile-cache", str(tmp_path / "cc"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [stage["stage"] for stage in report["stages"]] == ["engine none", "compiled none"]
    boot = report["compile_boot"]
    assert boot["compile_cache"] == "miss" and boot["cache_load_s"] >= 0 and boot["compile_s"] > 0
    assert report["compile_warmup_s"] == pytest.approx(boot["compile_s"] + boot["warm_up_s"])


def test_attention_backend_is_applied_and_a_wrong_name_is_a_boot_error() -> None:
    from worker.boot import build_engines
    from worker.boot_error import BootError
    from worker.config import Settings
    from worker.variant import Variant

    engine = create_klein_engine(model="tiny", attention_backend="native")
    processors = {
        type(m.processor).__name__: m.processor
        for m in engine.pipeline.transformer.modules()
        if hasattr(m, "processor")
    }
    assert processors and all(p._attention_backend == "native" for p in processors.values())
    (image,) = engine.generate(
        prompts=["x"], seeds=[1], references=[], width=64, height=64, num_steps=1, guidance_scale=1.0
    )
    assert image.size == (64, 64)

    settings = Settings(model="tiny", device="cpu", attention_backend="cudnn-please")
    with pytest.raises(
        BootError, match="ATTENTION_BACKEND 'cudnn-please' is not a diffusers attention backend"
    ):
        build_engines(settings, Variant("tiny", "none", "cpu", "test"))
