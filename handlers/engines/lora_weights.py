"""A LoRA file read and checked for the klein transformer: peft's key format, alpha/rank folded
into ``lora_B``, every layer matched against the transformer's Linear layers and their shapes.

The worker fuses the double-stream blocks' q/k/v projections (``speed.fuse_qkv``), while LoRAs
are trained on the unfused ``to_q``/``to_k``/``to_v``. diffusers maps adapters onto fused
projections only for LoKr, so ``_fuse_qkv`` does it here for LoRA, exactly: the fused adapter's
``lora_A`` stacks the three down-projections and its ``lora_B`` is their block diagonal (a shared
``lora_A``, as in BFL-format files, keeps its rank).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import Flux2KleinPipeline
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open

from handlers.errors import InvalidInput, JobError
from handlers.lora_files import AdapterFile

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
# Fused projection -> the unfused ones it replaced, in the order of its output rows.
FUSED_PROJECTIONS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}

Targets = Mapping[str, tuple[int, int]]  # Linear layer name -> (in_features, out_features)


@dataclass(frozen=True)
class LoraWeights:
    """A checked adapter in peft's key format, per-module alpha/rank folded into ``lora_B``."""

    sha256: str
    state: dict[str, torch.Tensor]
    rank: int


def linear_targets(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (module.in_features, module.out_features)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def read_adapter(file: AdapterFile, *, targets: Targets) -> LoraWeights:
    """Parse and check an adapter file against the transformer's Linear layers, or raise
    ``InvalidInput`` naming the adapter: not safetensors, not LoRA weights, layers this
    transformer does not have, or shapes of another model size."""
    field = file.field
    try:
        with safe_open(str(file.path), framework="pt"):
            pass  # the header parses: a safetensors file
        state, metadata = Flux2KleinPipeline.lora_state_dict(str(file.path), return_lora_metadata=True)
    except FileNotFoundError:
        # Evicted by another worker process sharing the cache folder (one per GPU): not the job's fault.
        raise JobError(f"{field}: the adapter file left the cache before it loaded", retryable=True) from None
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InvalidInput(f"{field}: not a LoRA safetensors file ({type(exc).__name__})") from None
    state = {key.removeprefix("transformer."): value for key, value in state.items()}
    pairs = _pairs(state, field)
    config = {k.removeprefix("transformer."): v for k, v in (metadata or {}).items()}
    pairs = {name: (a, b * _scaling(name, a.shape[0], config)) for name, (a, b) in pairs.items()}
    pairs = _fuse_qkv(pairs, targets, field)
    _check_targets(pairs, targets, field)
    weights = {}
    for name, (a, b) in pairs.items():
        weights[name + LORA_A], weights[name + LORA_B] = a, b
    return LoraWeights(sha256=file.sha256, state=weights, rank=max(a.shape[0] for a, _ in pairs.values()))


def _pairs(state: Mapping[str, torch.Tensor], field: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    others = [k for k in state if not k.endswith((LORA_A, LORA_B))]
    if others or not state:
        example = f" (e.g. {others[0]!r})" if others else ""
        raise InvalidInput(
            f"{field}: {len(others) or 'no'} tensors of the file are not LoRA A/B weights{example}; "
            "a LoRA for the FLUX.2 transformer is expected"
        )
    names = {k.removesuffix(LORA_A).removesuffix(LORA_B) for k in state}
    half = [n for n in names if n + LORA_A not in state or n + LORA_B not in state]
    if half:
        raise InvalidInput(f"{field}: layer {half[0]!r} has only one of lora_A/lora_B")
    pairs = {n: (state[n + LORA_A], state[n + LORA_B]) for n in sorted(names)}
    for n, (a, b) in pairs.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InvalidInput(
                f"{field}: layer {n!r} has LoRA weights of shapes {tuple(a.shape)}/{tuple(b.shape)}"
            )
    return pairs


def _scaling(name: str, rank: int, config: Mapping[str, Any]) -> float:
    """peft's alpha/rank for one module, from the adapter's saved LoraConfig (1.0 without one:
    diffusers' convention for files without alphas, whose converters bake alpha in)."""
    alpha_pattern = config.get("alpha_pattern") or {}
    key = get_pattern_key(alpha_pattern.keys(), name) if alpha_pattern else None
    alpha = alpha_pattern.get(key, config.get("lora_alpha")) if key else config.get("lora_alpha")
    if alpha is None:
        return 1.0
    return float(alpha) / (rank**0.5 if config.get("use_rslora") else rank)


def _fuse_qkv(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], targets: Targets, field: str
) -> dict[str, Any]:
    pairs = dict(pairs)
    for fused, parts in FUSED_PROJECTIONS.items():
        prefixes = {n.rsplit(".", 1)[0] for n in pairs if n.rsplit(".", 1)[-1] in parts}
        for prefix in sorted(prefixes):
            target = f"{prefix}.{fused}"
            if target not in targets:
                continue  # unfused model (nunchaku never gets here): the parts are real layers
            found = [pairs.pop(f"{prefix}.{p}", None) for p in parts]
            fan_in, fan_out = targets[target]
            out_each = fan_out // len(parts)
            for part, f in zip(parts, found, strict=True):
                if f is not None and (f[0].shape[1], f[1].shape[0]) != (fan_in, out_each):
                    raise InvalidInput(
                        f"{field}: layer '{prefix}.{part}' is {fan_in}->{out_each} here, the adapter's is "
                        f"{f[0].shape[1]}->{f[1].shape[0]} (a LoRA for another model size?)"
                    )
            downs = [a for a, _ in (f for f in found if f is not None)]
            if all(f is not None for f in found) and all(torch.equal(downs[0], a) for a in downs[1:]):
                a = downs[0]  # one shared down-projection (BFL's fused qkv LoRA): rank stays
                b = torch.cat([f[1] for f in found if f is not None], dim=0)
            else:
                a = torch.cat(downs, dim=0)
                b = torch.zeros(out_each * len(parts), a.shape[0], dtype=downs[0].dtype)
                col = 0
                for i, f in enumerate(found):
                    if f is None:
                        continue
                    rank = f[0].shape[0]
                    b[i * out_each : (i + 1) * out_each, col : col + rank] = f[1]
                    col += rank
            pairs[target] = (a, b)
    return pairs


def _check_targets(
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], targets: Targets, field: str
) -> None:
    unknown = [n for n in pairs if n not in targets]
    if unknown:
        raise InvalidInput(
            f"{field}: {len(unknown)} of {len(pairs)} LoRA layers match no layer of this transformer "
            f"(e.g. {unknown[0]!r}); is it a LoRA for FLUX.2-klein?"
        )
    for name, (a, b) in pairs.items():
        expected = targets[name]
        if (a.shape[1], b.shape[0]) != expected:
            raise InvalidInput(
                f"{field}: layer {name!r} is {expected[0]}->{expected[1]} here, the adapter's is "
                f"{a.shape[1]}->{b.shape[0]} (a LoRA for another model size?)"
            )
