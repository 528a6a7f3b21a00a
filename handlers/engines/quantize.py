"""Weight quantization of a loaded klein pipeline: torchao FP8/INT8, and the nunchaku checks.

torchao's ``quantize_`` is applied to the modules directly rather than through diffusers'
``TorchAoConfig`` at ``from_pretrained`` time: the same call then serves a hub/folder load and the
random-weight benchmark pipeline, and diffusers 0.42's torchao loader cannot import torchao 0.18's
tensor classes (it logs "Unable to import `torchao` Tensor objects"). ``quantize_(device=...)``
moves one Linear at a time to the GPU and quantizes it there, so a variant that fits the card only
once quantized (klein-9B in FP8 on a 24-32 GB card) loads without ever being whole in bf16 on it.

What is quantized (every ``nn.Linear`` whose sides are multiples of 16, see ``quantizable``):

- the transformer, with activations too where the card has the tensor cores for it (FP8 on
  compute capability >= 8.9, INT8 everywhere): that is where the FLOPs are;
- the text encoder, weights only, in both cases: it runs once per job on 512 tokens, so its cost
  is memory, not FLOPs (Qwen3-8B is 16.4 GB in bf16, 11.7 GB after truncation to 27 layers, about
  half that in 8 bits), and weight-only keeps Qwen's outlier activation channels in bf16;
- never the VAE: convolutions, and small next to the other two.

nunchaku (SVDQuant 4-bit) ships its own pre-quantized transformers instead of quantizing ours:
``check_nunchaku`` refuses it with a clear message before any weight loads (see there).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from klein_facts.variants import NUNCHAKU_QUANTIZATIONS, QUANTIZATIONS, TORCHAO_QUANTIZATIONS

logger = logging.getLogger(__name__)

# torch._scaled_mm and the int8 kernels need both matrix sides to be multiples of 16.
QUANT_ALIGNMENT = 16
# The transformer's input and output projections: tiny FLOPs, and the layers most sensitive to
# rounding (they touch the latent directly), so they stay in bf16 like in most FP8 Flux recipes.
TRANSFORMER_SKIP = ("x_embedder", "proj_out")
# FP8 tensor cores (and torchao's dynamic-activation FP8 kernels) start with Ada/Hopper, sm_89.
FP8_COMPUTE_CAPABILITY = (8, 9)
# nunchaku's 4-bit kernels: INT4 on Turing/Ampere/Ada, NVFP4 on consumer Blackwell. Hopper (sm_90)
# and datacenter Blackwell have no build (see shared/reference/flux2-klein.md).
NUNCHAKU_CAPABILITIES: dict[str, tuple[tuple[int, int], ...]] = {
    "nunchaku-int4": ((7, 5), (8, 0), (8, 6), (8, 9)),
    "nunchaku-fp4": ((12, 0),),
}
NUNCHAKU_HINT = (
    "build the image with NUNCHAKU_WHEEL_URL=<a nunchaku wheel matching its torch and CUDA>; "
    "note: nunchaku has no Hopper (H100/H200) support"
)

Capability = tuple[int, int]


def device_capability(device: torch.device | str) -> Capability | None:
    """The CUDA compute capability of ``device``; None off CUDA (no FP8 tensor cores to use)."""
    target = torch.device(device)
    return torch.cuda.get_device_capability(target) if target.type == "cuda" else None


# Mutates a loaded pipeline in place (kept for callers that hold a pipeline, e.g. random weights).
Quantizer = Callable[[Any], None]


class UnsupportedQuantization(NotImplementedError):
    """The requested quantization cannot run in this build or on this card; raised before loading."""


@dataclass(frozen=True)
class QuantizationPlan:
    """The torchao configs for one pipeline (None: that component stays in its load dtype)."""

    name: str
    transformer: Any
    text_encoder: Any
    note: str = ""


def has_fp8_tensor_cores(capability: Capability | None) -> bool:
    return capability is not None and tuple(capability) >= FP8_COMPUTE_CAPABILITY


def fp8_config_for(capability: Capability | None) -> Any:
    """FP8 activations + weights (row-wise scales) where the card has FP8 tensor cores, else weights only.

    Dynamic row-wise FP8 is the fast path on Ada/Hopper/Blackwell (reference: 4B transformer step
    58.9 -> 46.8 ms compiled on an H100). Elsewhere (Ampere, CPU) FP8 can only be stored: weight-only
    dequantizes before a bf16 matmul, which halves the memory but is slower than plain bf16.
    """
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
    )

    if has_fp8_tensor_cores(capability):
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return Float8WeightOnlyConfig()


def int8_config() -> Any:
    """INT8 for the transformer: dynamic per-token activations and per-channel weights.

    Chosen over weight-only because ``int8`` is the pick for cards without FP8 (A100, 30-series),
    which all have INT8 tensor cores: at 4096+ image tokens the transformer is compute-bound and
    int8 x int8 matmuls (``torch._int_mm``) are what make it faster, once compiled. Weight-only
    INT8 only pays for memory-bound small-batch decoding, which this is not.
    """
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def text_encoder_config(quantization: str) -> Any:
    """Weight-only configs for the text encoder (memory is its cost, see the module docstring)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Float8WeightOnlyConfig() if quantization == "fp8" else Int8WeightOnlyConfig()


def plan_for(quantization: str, capability: Capability | None) -> QuantizationPlan:
    """The torchao configs for ``quantization`` ("fp8" or "int8") on a card of ``capability``."""
    if quantization == "fp8":
        note = ""
        if not has_fp8_tensor_cores(capability):
            note = (
                "no FP8 tensor cores (compute capability "
                f"{'.'.join(map(str, capability)) if capability else 'n/a'}): FP8 weights only, "
                "which saves memory but runs slower than bf16"
            )
        return QuantizationPlan("fp8", fp8_config_for(capability), text_encoder_config("fp8"), note)
    if quantization == "int8":
        return QuantizationPlan("int8", int8_config(), text_encoder_config("int8"))
    raise ValueError(f"{quantization!r} is not a torchao quantization ({TORCHAO_QUANTIZATIONS})")


def quantizable(module: torch.nn.Module, fqn: str, *, skip: tuple[str, ...] = ()) -> bool:
    """``quantize_`` filter: Linear layers with 16-aligned sides, not named in ``skip``."""
    if not isinstance(module, torch.nn.Linear):
        return False
    if module.in_features % QUANT_ALIGNMENT or module.out_features % QUANT_ALIGNMENT:
        return False
    name = fqn.rsplit(".", 1)[-1]
    return name not in skip


def quantize_pipeline(
    pipeline: Any,
    quantization: str,
    *,
    device: torch.device | None = None,
    capability: Capability | None = None,
) -> QuantizationPlan:
    """Quantize ``pipeline``'s transformer and text encoder in place; they end on ``device``.

    ``device`` None quantizes where the weights already are; ``capability`` None reads it from that
    device (CUDA) or means "no FP8 tensor cores" (CPU). Run after QKV fusion and text-encoder
    truncation, so the fused projections are the ones quantized and dropped layers cost nothing.
    """
    from torchao.quantization import quantize_

    target = device if device is not None else next(pipeline.transformer.parameters()).device
    if capability is None:
        capability = device_capability(target)
    plan = plan_for(quantization, capability)
    if plan.note:
        logger.warning("quantization %s: %s", quantization, plan.note)
    quantize_(
        pipeline.transformer,
        plan.transformer,
        filter_fn=lambda m, fqn: quantizable(m, fqn, skip=TRANSFORMER_SKIP),
        device=device,
    )
    quantize_(pipeline.text_encoder, plan.text_encoder, filter_fn=quantizable, device=device)
    logger.info(
        "quantized %s: transformer %s, text encoder %s",
        quantization,
        type(plan.transformer).__name__,
        type(plan.text_encoder).__name__,
    )
    return plan


def check_quantization(
    quantization: str, *, capability: Capability | None = None, nunchaku_transformer: str | None = None
) -> None:
    """Refuse an unknown or unusable ``quantization`` before any weight loads."""
    if quantization == "auto":
        raise ValueError("quantization 'auto' must be resolved to a concrete choice at boot")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {QUANTIZATIONS}")
    if quantization in NUNCHAKU_QUANTIZATIONS:
        check_nunchaku(quantization, capability=capability, transformer_path=nunchaku_transformer)
    elif quantization in TORCHAO_QUANTIZATIONS and importlib.util.find_spec("torchao") is None:
        raise UnsupportedQuantization(f"{quantization} needs the torchao package, which is not installed")


def quantizer_for(quantization: str) -> Quantizer | None:
    """A function quantizing a pipeline in place where it lies (None for "none"); errors come first.

    nunchaku is not a quantizer (it replaces the transformer at load), so it is refused here.
    """
    check_quantization(quantization)
    if quantization == "none":
        return None

    def quantize(pipeline: Any) -> None:
        quantize_pipeline(pipeline, quantization)

    return quantize


def nunchaku_problem(quantization: str, capability: Capability | None) -> str | None:
    """Why ``quantization`` cannot run on a card of ``capability`` (None when it can)."""
    supported = NUNCHAKU_CAPABILITIES[quantization]
    if capability is None:
        return f"{quantization} needs an NVIDIA GPU"
    if tuple(capability) not in supported:
        arch = "Hopper" if capability[0] == 9 else f"sm_{capability[0]}{capability[1]}"
        wanted = ", ".join(f"sm_{a}{b}" for a, b in supported)
        return f"{quantization} does not run on {arch} (nunchaku builds it for {wanted} only)"
    return None


def check_nunchaku(quantization: str, *, capability: Capability | None, transformer_path: str | None) -> None:
    """Raise ``UnsupportedQuantization`` unless a nunchaku transformer can really be used.

    In order: the package must be importable (it is not on PyPI under that name: the image is
    built with NUNCHAKU_WHEEL_URL); the card must be one nunchaku builds for; and since nunchaku
    has no official FLUX.2 support yet (a community pull request exists), a pre-quantized FLUX.2
    klein transformer must be given (``transformer_path``) and the installed nunchaku must have a
    FLUX.2 transformer class to load it with (``nunchaku_transformer_class``).
    """
    if importlib.util.find_spec("nunchaku") is None:
        raise UnsupportedQuantization(f"{quantization}: nunchaku is not installed; {NUNCHAKU_HINT}")
    problem = nunchaku_problem(quantization, capability)
    if problem:
        raise UnsupportedQuantization(f"{problem}; use QUANTIZATION=fp8 or none")
    if not transformer_path:
        raise UnsupportedQuantization(
            f"{quantization}: nunchaku has no official FLUX.2 support yet, so there is no hub "
            "transformer to download; give a nunchaku-quantized FLUX.2-klein transformer folder "
            "(NUNCHAKU_TRANSFORMER_PATH) or use QUANTIZATION=fp8"
        )
    nunchaku_transformer_class()


# Class names a FLUX.2-capable nunchaku may export (the community port's naming, both casings).
NUNCHAKU_FLUX2_CLASSES = ("NunchakuFlux2Transformer2DModel", "NunchakuFlux2Transformer2dModel")


def nunchaku_transformer_class() -> Any:
    """The installed nunchaku's FLUX.2 transformer class, or a clear error when it has none."""
    module = importlib.import_module("nunchaku")
    for name in NUNCHAKU_FLUX2_CLASSES:
        found = getattr(module, name, None)
        if found is not None:
            return found
    version = getattr(module, "__version__", "?")
    raise UnsupportedQuantization(
        f"nunchaku {version} has no FLUX.2 transformer ({' / '.join(NUNCHAKU_FLUX2_CLASSES)}); "
        "install a build with FLUX.2 support or use QUANTIZATION=fp8"
    )


def load_nunchaku_transformer(path: str, *, device: torch.device) -> Any:
    """Load a nunchaku-quantized FLUX.2 transformer (after ``check_nunchaku`` passed)."""
    logger.info("loading nunchaku transformer from %s", path)
    return nunchaku_transformer_class().from_pretrained(path).to(device)
