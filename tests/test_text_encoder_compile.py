"""The text encoder as an optional compile region: same embeddings and images as eager, one graph
for all its layers, compiled by the warm-up and reused by jobs of any image size, off by default.

Dynamo's eager backend traces (fullgraph, guards, recompiles) without codegen, so these run in
seconds; one test compiles with inductor's C++ backend for real.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from handlers.engines.compile_cache import compile_counts
from handlers.engines.klein import KleinEngine
from handlers.engines.klein_loader import create_klein_engine
from handlers.engines.speed import compile_pipeline
from klein_facts.compile_regions import DEFAULT_COMPILE_REGIONS, KLEIN_COMPILE_REGIONS

PROMPTS = ["a red car on a wet street", "x"]
# Longer than the tiny model's 64 tokens: truncated, it fills every position.
LONG_PROMPT = "a lighthouse on a cliff at dusk, waves below, gulls above " * 10


def _embeddings(engine: KleinEngine, prompts: list[str]) -> torch.Tensor:
    with torch.inference_mode():
        embeds, _ = engine.pipeline.encode_prompt(
            prompt=prompts,
            max_sequence_length=engine.max_sequence_length,
            text_encoder_out_layers=engine.text_encoder_out_layers,
        )
    return embeds


def _image(engine: KleinEngine, batch: int, width: int, height: int) -> np.ndarray:
    (image, *_) = engine.generate(
        prompts=PROMPTS[:1] * batch,
        seeds=list(range(batch)),
        references=[],
        width=width,
        height=height,
        num_steps=1,
        guidance_scale=1.0,
    )
    assert image.size == (width, height)
    return np.asarray(image, dtype=np.int16)


def _traced_engine(regions: tuple[str, ...], sizes: tuple[tuple[int, int, int], ...]) -> KleinEngine:
    """The tiny engine with ``regions`` compiled by dynamo's eager backend, as build_engine would."""
    torch._dynamo.reset()
    engine = create_klein_engine(model="tiny", compile_sizes=sizes)
    compile_pipeline(engine.pipeline, regions=regions, backend="eager")
    engine.compiled, engine.compile_regions = True, regions
    return engine


def _unique_graphs() -> int:
    """Graphs dynamo traced in this process (``torch._dynamo.reset`` keeps the count: compare deltas)."""
    return int(counters["stats"]["unique_graphs"])


def test_the_regions_are_named_in_one_place_and_the_text_encoder_is_off_by_default() -> None:
    assert KLEIN_COMPILE_REGIONS == ("transformer", "vae", "text_encoder")
    # Compiling the text encoder waits for a GPU measurement (issue 10): it must not turn on unseen.
    assert DEFAULT_COMPILE_REGIONS == ("transformer", "vae")
    engine = create_klein_engine(model="tiny", compile=True)  # inductor, compiled lazily
    assert engine.compiled and engine.compile_regions == ("transformer", "vae")
    torch._dynamo.reset()
    before = _unique_graphs()
    _embeddings(engine, PROMPTS)  # would compile (slowly, with inductor) if the text encoder were a region
    assert _unique_graphs() == before


def test_an_unknown_region_is_refused_by_name_before_anything_compiles() -> None:
    engine = create_klein_engine(model="tiny")
    with pytest.raises(ValueError, match="unknown compile region.*upscaler, vea"):
        compile_pipeline(engine.pipeline, regions=("transformer", "vea", "upscaler"), backend="eager")
    with pytest.raises(ValueError, match="not the string 'vae'"):
        compile_pipeline(engine.pipeline, regions="vae", backend="eager")
    with pytest.raises(ValueError, match="unknown compile region.*text-encoder"):
        create_klein_engine(model="tiny", compile=True, compile_regions=("text-encoder",))
    torch._dynamo.reset()
    before = _unique_graphs()
    _image(engine, 1, 64, 64)  # the refused call left every part eager
    assert _unique_graphs() == before


def test_no_region_means_an_eager_engine() -> None:
    engine = create_klein_engine(model="tiny", compile=True, compile_regions=())
    assert not engine.compiled and engine.compile_regions == ()
    assert compile_pipeline(engine.pipeline, regions=[], backend="eager") == ()
    # Regions without compile: nothing compiled, nothing named (the compile cache keys on it).
    plain = create_klein_engine(model="tiny", compile_regions=KLEIN_COMPILE_REGIONS)
    assert not plain.compiled and plain.compile_regions == ()


def test_one_graph_serves_every_layer_and_any_image_size_after_the_warm_up() -> None:
    engine = _traced_engine(("text_encoder",), sizes=((1, 64, 64),))
    eager = create_klein_engine(model="tiny")
    layers = engine.pipeline.text_encoder.layers
    assert len(layers) > 1
    before = _unique_graphs()
    engine.warm_up()
    # One graph for all layers, and its twin for prompts that fill every token (no padding, so
    # transformers passes no attention mask): the warm-up compiled both.
    assert _unique_graphs() == before + 2
    torch.testing.assert_close(_embeddings(engine, PROMPTS[:1]), _embeddings(eager, PROMPTS[:1]))

    # Another image size: the text encoder sees the same (1, prompt length), so its graph is reused
    # as compiled code (a recompile would raise here), not skipped to eager; a long prompt too.
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = _image(engine, 1, 96, 64)
        torch.testing.assert_close(_embeddings(engine, [LONG_PROMPT]), _embeddings(eager, [LONG_PROMPT]))
    assert _unique_graphs() == before + 2
    assert np.abs(compiled - _image(eager, 1, 96, 64)).max() <= 1

    # Another batch, not warmed up: the stance the warm-up set runs it eager, compiling nothing.
    _image(engine, 2, 64, 128)
    assert _unique_graphs() == before + 2


def test_two_warmed_batches_leave_one_batch_generic_graph_for_every_later_batch() -> None:
    # dynamic=None: batch 1 compiles a static graph, batch 2 one with only the batch symbolic (the
    # padded prompt length never changes), which then serves batch 3 and 4 with no recompile.
    engine = _traced_engine(("text_encoder",), sizes=((1, 64, 64), (2, 64, 64)))
    eager = create_klein_engine(model="tiny")
    before = _unique_graphs()
    engine.warm_up()
    assert _unique_graphs() == before + 4  # batch 1, any batch; each with and without padding
    with torch.compiler.set_stance("fail_on_recompile"):
        for batch in (3, 4):
            for prompts in ((PROMPTS * batch)[:batch], [LONG_PROMPT] * batch):
                torch.testing.assert_close(_embeddings(engine, prompts), _embeddings(eager, prompts))
    assert _unique_graphs() == before + 4


def test_all_regions_trace_whole_and_match_the_eager_engine() -> None:
    engine = _traced_engine(KLEIN_COMPILE_REGIONS, sizes=((1, 64, 64),))
    eager = create_klein_engine(model="tiny")
    before = _unique_graphs()
    engine.warm_up()
    warmed = _unique_graphs()
    # Text encoder layer (padded and full prompts), two transformer block classes, VAE decoder.
    assert warmed - before >= 5
    torch.testing.assert_close(_embeddings(engine, PROMPTS), _embeddings(eager, PROMPTS))
    assert np.abs(_image(engine, 1, 64, 64) - _image(eager, 1, 64, 64)).max() <= 1
    _image(engine, 2, 96, 64)
    assert _unique_graphs() == warmed  # a later job of another size and batch compiles nothing


@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_a_quantized_text_encoder_traces_whole(quantization: str) -> None:
    # FP8/INT8 variants quantize the text encoder's Linears into torchao tensor subclasses: the
    # layer graph must still trace without a break (fullgraph) and give the same embeddings.
    engine = create_klein_engine(model="tiny", quantization=quantization)
    eager = _embeddings(engine, PROMPTS)
    torch._dynamo.reset()
    before = _unique_graphs()
    compile_pipeline(engine.pipeline, regions=("text_encoder",), backend="eager")
    torch.testing.assert_close(_embeddings(engine, PROMPTS), eager)
    assert _unique_graphs() == before + 1


@pytest.mark.timeout(600)  # one real inductor (C++) compile of the text encoder's layer graph
def test_inductor_compiled_text_encoder_gives_the_eager_embeddings_and_image() -> None:
    torch._dynamo.reset()
    before = compile_counts()
    engine = create_klein_engine(
        model="tiny", compile=True, compile_regions=["text_encoder"], compile_sizes=((1, 64, 64),)
    )
    eager = create_klein_engine(model="tiny")
    assert engine.compiled and engine.compile_regions == ("text_encoder",)
    engine.warm_up()
    after = compile_counts()
    # Inductor built the graph, or found it in its local cache from an earlier run: one either way.
    built = after["graphs_compiled"] - before["graphs_compiled"]
    cached = after["graphs_from_cache"] - before["graphs_from_cache"]
    assert built + cached == 2 and after["dynamo_graphs"] == before["dynamo_graphs"] + 2
    torch.testing.assert_close(_embeddings(engine, PROMPTS[:1]), _embeddings(eager, PROMPTS[:1]))
    assert np.abs(_image(engine, 1, 64, 64) - _image(eager, 1, 64, 64)).max() <= 1


def test_lora_hotswap_slots_only_when_the_transformer_is_compiled() -> None:
    # The slot exists so adapters can change under compiled transformer blocks; with only the text
    # encoder compiled, adapters load as for an eager engine and no slot enters the compile key.
    from worker.compile_boot import lora_slot

    text_only = create_klein_engine(
        model="tiny", compile=True, compile_regions=("text_encoder",), max_loras=1, lora_max_rank=4
    )
    full = create_klein_engine(model="tiny", compile=True, max_loras=1, lora_max_rank=4)
    assert (lora_slot(text_only), lora_slot(full)) == ("none", "1x4")
