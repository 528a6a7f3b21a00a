"""Loading FLUX.2-klein and making it the engine: the pipeline from the hub, a local folder or the
tiny random model (its text encoder read only as deep as the prompt embeddings go), then the steps
that speed it up (text-encoder truncation, QKV fusion, quantization, LoRA slots, compilation), in
the order ``build_engine`` lists.

Runs once at boot; ``handlers.engines.klein.KleinEngine`` is what it returns and what jobs call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, TypedDict, Unpack

import torch
from diffusers import Flux2KleinPipeline
from transformers.utils import cached_file

from handlers.engines.klein import DEFAULT_COMPILE_SIZES, REAL_MAX_SEQUENCE_LENGTH, KleinEngine
from handlers.engines.lora import create_lora_adapters
from handlers.engines.quantize import (
    Capability,
    check_quantization,
    device_capability,
    load_nunchaku_transformer,
    quantize_pipeline,
)
from handlers.engines.speed import (
    compile_regions_checked,
    enable_fast_math,
    fuse_qkv,
    set_attention_backend,
)
from handlers.engines.text_encoder import load_text_encoder, truncate_text_encoder
from klein_facts.compile_regions import DEFAULT_COMPILE_REGIONS
from klein_facts.text_encoder import stacked_layers
from klein_facts.variants import HUB_IDS, MODELS, NUNCHAKU_QUANTIZATIONS, TORCHAO_QUANTIZATIONS

logger = logging.getLogger(__name__)


def load_pipeline(
    source: str,
    *,
    torch_dtype: torch.dtype,
    token: str | None = None,
    cache_dir: str | None = None,
    **components: Any,
) -> Flux2KleinPipeline:
    """Load a klein pipeline from a hub id or a local diffusers folder (``save_pretrained`` layout).

    ``components`` replace the named parts instead of loading them (a nunchaku transformer). The
    text encoder is read cut to its last used layer (``load_text_encoder``), unless given.
    """
    local = Path(source).is_dir()
    # A local folder must never trigger a hub lookup (offline boxes, gated repos).
    hub: dict[str, Any] = {"token": token, "cache_dir": cache_dir, "local_files_only": local}
    logger.info("loading FLUX.2-klein pipeline from %s %s", "folder" if local else "hub", source)
    if "text_encoder" not in components:
        # transformers' cached_file, not diffusers' load_config: the latter passes huggingface_hub
        # a deprecated argument, which prints a warning outside the log on every hub boot.
        transformer_config = json.loads(
            Path(cached_file(source, "config.json", subfolder="transformer", **hub)).read_text()
        )
        components["text_encoder"] = load_text_encoder(
            source,
            joint_attention_dim=transformer_config["joint_attention_dim"],
            torch_dtype=torch_dtype,
            **hub,
        )
    # diffusers leaves a given component's folder out of its download and its load.
    return Flux2KleinPipeline.from_pretrained(source, dtype=torch_dtype, **hub, **components)


def prompt_settings(pipeline: Flux2KleinPipeline) -> tuple[tuple[int, ...], int]:
    """Text-encoder layers to stack (``stacked_layers``) and the prompt length, from the loaded
    model's own configs. A text encoder read cut gives the same layers as the whole one."""
    text_config = pipeline.text_encoder.config
    layers = stacked_layers(
        num_layers=text_config.num_hidden_layers,
        hidden_size=text_config.hidden_size,
        joint_attention_dim=pipeline.transformer.config.joint_attention_dim,
    )
    max_length = min(REAL_MAX_SEQUENCE_LENGTH, int(pipeline.tokenizer.model_max_length))
    return layers, max_length


class EngineOptions(TypedDict, total=False):
    """How a loaded pipeline is made the engine, whatever its weights: ``build_engine``'s keywords
    that ``create_klein_engine`` passes through (their defaults are ``build_engine``'s)."""

    compile: bool
    compile_sizes: Sequence[tuple[int, int, int]]
    compile_regions: Collection[str]
    max_loras: int
    lora_max_rank: int
    attention_backend: str | None


def create_klein_engine(
    *,
    model: str,
    model_path: str | None = None,
    quantization: str = "none",
    device: str | None = None,
    hf_token: str | None = None,
    cache_dir: str | None = None,
    dtype: torch.dtype | None = None,
    nunchaku_transformer: str | None = None,
    **options: Unpack[EngineOptions],
) -> KleinEngine:
    """Build the engine for ``model`` ("tiny", "klein-4b", "klein-9b") on ``device``.

    ``tiny`` builds random weights in-process (float32, CPU unless a device is given). The real
    variants load ``model_path`` or their hub id in bf16 (``cache_dir``: the hub cache, e.g.
    ``$HF_HOME/hub``); ``dtype`` overrides that (tests run a saved tiny folder in float32 on CPU).
    ``quantization`` "auto" must be resolved by boot first; every quantization problem is raised
    before a weight loads. ``nunchaku_transformer``: a nunchaku-quantized FLUX.2 transformer folder,
    for nunchaku-*. ``options`` go to ``build_engine`` as they are (``EngineOptions``).
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    # A bad name fails before any weight loads.
    compile_regions_checked(options.get("compile_regions", DEFAULT_COMPILE_REGIONS))
    if model == "tiny" and quantization == "auto":
        # Random weights have nothing to pick a precision for; "auto" simply means full precision.
        quantization = "none"
    default_device = "cpu" if model == "tiny" else ("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.device(device or default_device)
    capability = device_capability(target)
    check_quantization(quantization, capability=capability, nunchaku_transformer=nunchaku_transformer)
    if model == "tiny":
        from handlers.engines.tiny import build_tiny_pipeline

        torch_dtype = dtype or torch.float32
        pipeline = build_tiny_pipeline()
        if torch_dtype != torch.float32:  # built in float32; cast only when asked (e.g. bf16 on a GPU)
            pipeline.to(dtype=torch_dtype)
        name = "flux2-klein-tiny"
    else:
        torch_dtype = dtype or torch.bfloat16
        components = {}
        if quantization in NUNCHAKU_QUANTIZATIONS and nunchaku_transformer:
            components["transformer"] = load_nunchaku_transformer(nunchaku_transformer, device=target)
        source = model_path or HUB_IDS[model]
        pipeline = load_pipeline(
            source, torch_dtype=torch_dtype, token=hf_token, cache_dir=cache_dir, **components
        )
        name = f"flux2-klein-{model.removeprefix('klein-')}-{_precision_label(quantization, torch_dtype)}"
    return build_engine(
        pipeline, name=name, device=target, quantization=quantization, capability=capability, **options
    )


def build_engine(
    pipeline: Flux2KleinPipeline,
    *,
    name: str,
    device: torch.device,
    quantization: str = "none",
    compile: bool = False,
    compile_sizes: Sequence[tuple[int, int, int]] = DEFAULT_COMPILE_SIZES,
    compile_regions: Collection[str] = DEFAULT_COMPILE_REGIONS,
    capability: Capability | None = None,
    max_loras: int = 0,
    lora_max_rank: int = 64,
    attention_backend: str | None = None,
) -> KleinEngine:
    """Make a loaded pipeline (on the CPU, or already on ``device``) the engine, in this order:

    1. truncate the text encoder after its last used layer (always; bit-identical embeddings),
    2. fuse the transformer's QKV projections (always),
    3. quantize (fp8/int8), one Linear at a time onto ``device``, before the rest moves there,
    4. move to ``device``,
    5. LoRA adapter handling for ``max_loras`` per job (compiled: hotswap slots, which must exist
       before compiling; see ``handlers.engines.lora``),
    6. compile ``compile_regions`` (with ``compile``; ``klein_facts.compile_regions``, by default the
       transformer blocks and the VAE decoder; on a CPU inductor builds C++, which serves the tests
       of the compiled path and the compile cache). No region at all means an eager engine. The
       wrappers go in place on the engine's first run (``KleinEngine.compile_at_first_run``).
    """
    regions = compile_regions_checked(compile_regions)
    layers, max_length = prompt_settings(pipeline)
    pipeline.text_encoder = truncate_text_encoder(pipeline.text_encoder, max(layers))
    nunchaku = quantization in NUNCHAKU_QUANTIZATIONS  # its transformer comes fused and compiled
    if not nunchaku:
        fuse_qkv(pipeline.transformer)
    if quantization in TORCHAO_QUANTIZATIONS:
        quantize_pipeline(pipeline, quantization, device=device, capability=capability)
    pipeline.to(device)
    if attention_backend:  # after the QKV fusion, which rebuilds no processor but is done first anyway
        set_attention_backend(pipeline.transformer, attention_backend)
    # The nunchaku transformer comes compiled; compiling nothing is no compiled engine either.
    compiled = compile and not nunchaku and bool(regions)
    if device.type == "cuda":
        enable_fast_math()
    # Hotswap slots only where LoRA weights meet compiled code: the transformer's blocks.
    hotswap = compiled and "transformer" in regions
    loras = create_lora_adapters(
        pipeline, quantization=quantization, max_loras=max_loras, max_rank=lora_max_rank, hotswap=hotswap
    )
    logger.info(
        "klein engine %s ready on %s (text layers %s, max %d tokens, compiled %s)",
        name,
        device,
        layers,
        max_length,
        ", ".join(regions) if compiled else "nothing",
    )
    engine = KleinEngine(
        pipeline=pipeline,
        name=name,
        device=device,
        text_encoder_out_layers=layers,
        max_sequence_length=max_length,
        loras=loras,
        compile_sizes=compile_sizes,
        attention_backend=attention_backend,
    )
    if compiled:
        engine.compile_at_first_run(regions)
    return engine


def _precision_label(quantization: str, dtype: torch.dtype) -> str:
    if quantization != "none":
        return quantization
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
