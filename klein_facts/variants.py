"""The klein variants a worker can serve: model names, quantization names, the ``auto`` rules, labels,
and what memory each variant needs.

Read by the worker's settings and model choice, the handlers' quantization code, the benchmark scripts
and the provisioning CLI, which sizes the cards it rents by the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

GIB = 1024**3  # memory sizes below are in GiB, as NVML and torch report them

# The models the worker loads; "tiny" is a random-weight stand-in for CPU tests and demos.
Model = Literal["klein-4b", "klein-9b", "tiny"]
# MODEL: a model, or "auto" (chosen at boot from the card, or from a benchmark profile).
ModelSetting = Literal["auto", Model]
MODELS: tuple[Model, ...] = get_args(Model)
# The FLUX.2-klein checkpoints proper (what MODEL=auto may choose and the fleet may rent for).
KLEIN_MODELS: tuple[Model, ...] = tuple(m for m in MODELS if m != "tiny")
# Where the hub keeps each checkpoint (a diffusers folder: MODEL_PATH takes a downloaded copy).
HUB_IDS: dict[str, str] = {
    "klein-4b": "black-forest-labs/FLUX.2-klein-4B",
    "klein-9b": "black-forest-labs/FLUX.2-klein-9B",
}
# Weights under a non-commercial licence: served only with ALLOW_NON_COMMERCIAL (or MODEL pinned).
NON_COMMERCIAL_MODELS: tuple[Model, ...] = ("klein-9b",)


def licensed(model: str, *, allow_non_commercial: bool, pinned: str = "auto") -> bool:
    """Whether a worker may serve ``model`` unasked: non-commercial weights only with
    ALLOW_NON_COMMERCIAL, or when MODEL (``pinned``) names them."""
    return model not in NON_COMMERCIAL_MODELS or allow_non_commercial or pinned == model


# Weight quantizations; "none" is the checkpoint's own bf16.
Quantization = Literal["none", "fp8", "int8", "nunchaku-int4", "nunchaku-fp4"]
# QUANTIZATION: a quantization, or "auto" (default_quantization's rule; MODEL=auto: the VRAM table).
QuantizationSetting = Literal["auto", Quantization]
QUANTIZATIONS: tuple[Quantization, ...] = get_args(Quantization)
QUANTIZATION_SETTINGS: tuple[str, ...] = ("auto", *QUANTIZATIONS)
# Applied by torchao to the loaded modules (handlers/engines/quantize.py).
TORCHAO_QUANTIZATIONS: tuple[Quantization, ...] = ("fp8", "int8")
# nunchaku's own pre-quantized SVDQuant 4-bit transformers.
NUNCHAKU_QUANTIZATIONS: tuple[Quantization, ...] = ("nunchaku-int4", "nunchaku-fp4")


def default_quantization(model: str) -> Quantization:
    """What QUANTIZATION=auto means once MODEL is pinned: FP8 for klein-9B, full precision else."""
    return "fp8" if model == "klein-9b" else "none"


def variant_name(model: str, quantization: str) -> str:
    """``klein-4b-bf16``, ``klein-9b-fp8``, ``klein-tiny``: the model and its precision in one word."""
    if model == "tiny":
        return "klein-tiny"
    return f"{model}-{'bf16' if quantization == 'none' else quantization}"


def variant_label(model: str, quantization: str) -> str:
    """The name results, logs and profiles carry: ``flux2-klein-4b-bf16``, ``flux2-klein-tiny``."""
    return f"flux2-{variant_name(model, quantization)}"


@dataclass(frozen=True, slots=True)
class VramNeed:
    """What one variant needs of a card, serving 1024x1024 with a few references, with headroom.

    Two figures for two questions, which is why they differ:

    - ``free_gib``: the free memory (GiB, as NVML reports it) MODEL=auto asks of the card at boot before
      it picks this variant. What is free on a card is less than its size (the driver's and other
      processes' share), so this is the peak plus a few GiB of headroom, not a card size.
    - ``card_gb``: the size of card (GB, as Vast lists ``gpu_ram``, 1 GB = 1000 MB) the provisioning CLI
      rents for this variant: the next card class above the peak (16, 24, 32 GB), so a rented card
      also passes the worker's free-memory check once its driver has taken its share.
    """

    model: Model
    quantization: Quantization
    free_gib: float
    card_gb: float


# From the seed benchmark (RTX 5090): 4B BF16 peaks at 17.3 GB, 9B FP8 at 26.3 GB; 4B FP8 halves the
# transformer and text encoder weights (~9 GB at rest) and fits 16 GB cards. Largest first: the order
# MODEL=auto tries them in.
VRAM_NEEDS: tuple[VramNeed, ...] = (
    VramNeed("klein-9b", "fp8", free_gib=30.0, card_gb=32.0),
    VramNeed("klein-4b", "none", free_gib=21.0, card_gb=24.0),
    VramNeed("klein-4b", "fp8", free_gib=12.0, card_gb=16.0),
)


def free_gib_needed() -> dict[tuple[str, str], float]:
    """(model, quantization) -> free GiB at boot, largest variant first."""
    return {(n.model, n.quantization): n.free_gib for n in VRAM_NEEDS}


def card_gb_by_variant() -> dict[str, float]:
    """Variant name -> card GB to rent: ``klein-4b-fp8`` and the like, and the bare model name for its
    default quantization (``klein-9b`` means klein-9B in FP8, as QUANTIZATION=auto does)."""
    table: dict[str, float] = {}
    for model in KLEIN_MODELS:
        needs = sorted((n for n in VRAM_NEEDS if n.model == model), key=lambda n: -n.card_gb)
        table[model] = next(n.card_gb for n in needs if n.quantization == default_quantization(model))
        for need in needs:
            table[variant_name(model, need.quantization)] = need.card_gb
    return table


def smaller_variant(model: str, quantization: str) -> tuple[Model, Quantization] | None:
    """The next smaller variant to suggest when ``(model, quantization)`` does not fit (SPEC section 3's
    ladder): down VRAM_NEEDS' order (9B FP8 -> 4B BF16 -> 4B FP8); a model's BF16 or INT8 outside that
    table drops to the same model in FP8 first. None at the bottom, and for tiny and nunchaku."""
    ladder = [(n.model, n.quantization) for n in VRAM_NEEDS]
    if (model, quantization) in ladder:
        at = ladder.index((model, quantization))  # type: ignore[arg-type]
        return ladder[at + 1] if at + 1 < len(ladder) else None
    if quantization in ("none", "int8"):
        return next((v for v in ladder if v == (model, "fp8")), None)
    return None
