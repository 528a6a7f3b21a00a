"""Speed steps applied to a loaded klein pipeline: fused QKV, attention backend, compilation.
(The text encoder's cut to the layers it uses is ``handlers.engines.text_encoder``.)

Each step keeps the pipeline's interface, so ``Flux2KleinPipeline.__call__`` runs unchanged:

- ``fuse_qkv``: one [q;k;v] matmul instead of three in the double-stream blocks (the single-stream
  blocks are fused by design).
- ``compile_pipeline``: regional ``torch.compile`` of the chosen ``regions`` (``KLEIN_COMPILE_REGIONS``),
  each compiled where it repeats or where its cost sits:

  - ``transformer``: its repeated blocks (one graph per block class, reused by every instance).
    Boot cost, from the reference measurements on an H100: 45-60 s to compile the whole 4B
    transformer, several-fold less regionally; gain: 4B 1024^2 step 85.9 -> 58.9 ms.
  - ``vae``: the VAE decoder, in channels_last. Boot cost 20-38 s; decode 91 -> 38 ms.
  - ``text_encoder``: each Qwen3 decoder layer (one graph for all of them) at the fixed 512-token
    prompt length. Off by default (``DEFAULT_COMPILE_REGIONS``): whether it pays for its compile
    time is for a GPU measurement to say (issue 10), not assumed.

  Compilation is lazy: the warm-up pays it at boot, once per process unless the compile cache
  (COMPILE_CACHE) brings the graphs from an earlier start.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

import torch

from klein_facts.compile_regions import DEFAULT_COMPILE_REGIONS, KLEIN_COMPILE_REGIONS

logger = logging.getLogger(__name__)

# The unfused projections fuse_projections() copies from. diffusers keeps them, doubling those
# weights (0.6 GB in 4B, 1.6 GB in 9B); once fused the processors never read them again.
_UNFUSED_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def fuse_qkv(transformer: Any) -> None:
    """Fuse the q/k/v (and added q/k/v) projections of every attention module, then drop the originals."""
    transformer.fuse_qkv_projections()
    dropped = 0
    for module in transformer.modules():
        if not getattr(module, "fused_projections", False):
            continue
        for name in _UNFUSED_PROJECTIONS:
            if isinstance(getattr(module, name, None), torch.nn.Module):
                delattr(module, name)
                dropped += 1
    logger.info("fused QKV projections (%d unfused projections dropped)", dropped)


class UnknownAttentionBackend(ValueError):
    """ATTENTION_BACKEND names no diffusers backend (a boot error, not a crash)."""


def set_attention_backend(transformer: Any, name: str) -> None:
    """Route the transformer's attention through diffusers' backend ``name`` (ATTENTION_BACKEND).

    At klein-4B's attention shape (1, 24, 4608, 128) PyTorch's default SDPA path reaches ~329
    TFLOP/s on an H100 against ~631 for cuDNN attention (PyTorch issue 142132): ``_native_cudnn``
    is the candidate, chosen by measurement (scripts/bench_gpu.py --attention-backend), not assumed.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = sorted(member.value for member in AttentionBackendName)
    if name not in known:
        raise UnknownAttentionBackend(
            f"ATTENTION_BACKEND {name!r} is not a diffusers attention backend: {', '.join(known)}"
        )
    transformer.set_attention_backend(name)
    logger.info("attention backend: %s", name)


def enable_fast_math() -> None:
    """TF32 for any float32 matmul/conv left (the models run in bf16/fp16, so this is cheap
    insurance), and cuDNN autotuning: the VAE and the upscaler see few distinct shapes."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def compile_forward(module: torch.nn.Module, **options: Any) -> None:
    """``torch.compile`` ``module``'s own ``forward``, in place; its hooks stay eager around it.

    Not ``Module.compile()``: that compiles ``nn.Module._call_impl``, and torch's precompiled
    cache (``worker.compile_boot``: dynamo's output carried in the compile bundle) files a compiled
    function under its qualified name and first line. Every region would then share
    ``Module._call_impl``'s entry, each one's overwriting the last. Compiled through their own
    ``forward`` (``Flux2TransformerBlock.forward``, ``Decoder.forward``, ...) the regions get one
    entry each, and every instance of a block class shares its class's.
    """
    if torch._dynamo.config.caching_precompile:
        options["options"] = {**options.get("options", {}), "guard_filter_fn": serializable_guards}
    module.forward = torch.compile(module.forward, **options)


def serializable_guards(entries: Sequence[Any]) -> list[bool]:
    """Keep the guards a precompiled function can carry to another process (a ``guard_filter_fn``).

    Caching precompile drops the identity guards itself (ID_MATCH and those built on it), but not
    every guard it then cannot serialize: Qwen3's decoder layer leaves a CLASS_MATCH on
    ``type(self)``, and torch 2.14 then trips over its own bypass of the package (an
    AssertionError that fails the compile). Those guards pin objects by identity, which another
    process cannot check anyway; what they would protect is pinned by the compile bundle's key, and
    a function compiled through its own ``forward`` only ever runs for that class.
    """
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [
        entry.guard_type not in unsupported
        and not unsupported.intersection(entry.derived_guard_types or ())
        # A TYPE_MATCH on a class defined inside a function: no other process can name it either.
        and not getattr(entry.orig_guard, "_unserializable", False)
        for entry in entries
    ]


def compile_transformer(
    transformer: Any, *, dynamic: bool | None = True, fullgraph: bool = True, backend: str = "inductor"
) -> None:
    """Compile the transformer's repeated blocks in place (regional compilation).

    ``dynamic=True`` compiles shape-generic graphs up front: job sizes, batch sizes and reference
    counts all change the token count, and each new static shape would otherwise stall a job on a
    recompile (and hit dynamo's recompile limit). ``backend="eager"`` only traces (tests).
    """
    # diffusers' compile_repeated_blocks, with compile_forward in place of Module.compile.
    repeated = getattr(transformer, "_repeated_blocks", None) or ()
    for block in [m for m in transformer.modules() if type(m).__name__ in repeated] or [transformer]:
        compile_forward(block, fullgraph=fullgraph, dynamic=dynamic, backend=backend)
    logger.info("transformer blocks compiled lazily (backend %s, dynamic %s)", backend, dynamic)


def compile_vae_decoder(vae: Any, *, dynamic: bool | None = True, backend: str = "inductor") -> None:
    """Compile the VAE decoder in channels_last (alone, channels_last is slower; compiled, 91 -> 38 ms)."""
    vae.to(memory_format=torch.channels_last)
    compile_forward(vae.decoder, fullgraph=True, dynamic=dynamic, backend=backend)
    logger.info("VAE decoder compiled lazily (backend %s)", backend)


def compile_text_encoder(
    text_encoder: Any, *, dynamic: bool | None = None, backend: str = "inductor"
) -> None:
    """Compile each decoder layer of the (truncated) Qwen3 text encoder in place: one graph for all.

    Regional, like ``compile_repeated_blocks`` for the transformer: every layer runs the same code
    on same-shaped weights, so dynamo traces one graph and every layer reuses it. Only the layer's
    ``forward`` is compiled, not ``module.compile()``'s ``_call_impl``: transformers collects
    ``output_hidden_states`` through forward hooks on each decoder layer, and compiled, those hooks
    read a ContextVar and guard on the length of the list they append to, which recompiles for
    every layer until dynamo's recompile limit breaks ``fullgraph`` (tried: transformers 5.24,
    torch 2.14). With the hooks left eager around it, the layer itself traces whole: position
    embeddings as a (cos, sin) tensor pair, the 4D padding mask as a tensor, ``cache=None``. A
    prompt that fills every token has no padding, and transformers then passes no mask at all
    (SDPA's causal path): a second graph, which ``KleinEngine.warm_up`` compiles too.

    Shapes: the pipeline pads every prompt to ``max_sequence_length`` (512) tokens, so the sequence
    length never changes; the batch is the job's number of prompts (``KleinEngine.generate`` passes
    one prompt per image; the negative prompt of guided, undistilled models is a second call of
    that same batch). So the shape is (prompts in the job, 512): fixed in length, not in batch.
    ``dynamic=None`` (dynamo's automatic dynamic shapes) fits exactly that: the first batch
    compiles a static graph, a second batch in the warm-up's sizes recompiles with only the batch
    symbolic (the length never changed, so it stays a static 512), and that graph serves every
    later batch above 1. ``dynamic=False`` would leave any batch not warmed up eager, and
    ``dynamic=True`` would make the 512 symbolic too while batch 1 stays specialised anyway.
    """
    layers = getattr(text_encoder, "base_model", text_encoder).layers
    for layer in layers:
        compile_forward(layer, fullgraph=True, dynamic=dynamic, backend=backend)
    logger.info("text encoder layers compiled lazily (%d layers, backend %s)", len(layers), backend)


def compile_regions_checked(regions: Collection[str]) -> tuple[str, ...]:
    """``regions`` as a sorted tuple of names, or a ValueError naming those that are not regions."""
    if isinstance(regions, str):  # "vae" would otherwise read as the regions "v", "a", "e"
        raise ValueError(f"compile regions must be a collection of names, not the string {regions!r}")
    unknown = sorted(set(regions) - set(KLEIN_COMPILE_REGIONS))
    if unknown:
        raise ValueError(
            f"unknown compile region(s) {', '.join(unknown)}; known: {', '.join(KLEIN_COMPILE_REGIONS)}"
        )
    return tuple(sorted(set(regions)))


def compile_pipeline(
    pipeline: Any,
    *,
    regions: Collection[str] = DEFAULT_COMPILE_REGIONS,
    backend: str = "inductor",
    dynamic: bool = True,
) -> tuple[str, ...]:
    """Regional compilation of the named ``regions`` (see ``KLEIN_COMPILE_REGIONS``); returns them sorted.

    Unknown names raise ValueError before anything is compiled; an empty collection compiles
    nothing. Compilation happens on the first call; the engine's warm-up pays it at boot.
    ``dynamic``: shape-generic transformer and VAE graphs (the worker), or static ones (measured
    against them); the text encoder keeps its own automatic dynamic shapes either way.
    """
    chosen = compile_regions_checked(regions)
    if "transformer" in chosen:
        compile_transformer(pipeline.transformer, backend=backend, dynamic=dynamic)
    if "vae" in chosen:
        compile_vae_decoder(pipeline.vae, backend=backend, dynamic=dynamic)
    if "text_encoder" in chosen:
        compile_text_encoder(pipeline.text_encoder, backend=backend)
    return chosen
