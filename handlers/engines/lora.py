"""Per-job LoRA adapters on the klein transformer: check, apply for one job, take off after it.

Two modes, chosen at boot:

- eager (not compiled): diffusers' ``load_lora_weights`` loads each adapter once under a name
  taken from its content hash, ``set_adapters`` activates the job's adapters with their scales,
  and ``disable_lora`` after the job puts every LoRA layer back on its base layer's own output
  (bit-identical to a transformer that never had an adapter). The ``MAX_RESIDENT`` most recent
  adapters stay loaded for the next job while VRAM allows.
- hotswap (compiled transformer): before compiling, an all-zero adapter slot on every Linear
  layer with room for ``MAX_LORAS`` adapters of rank ``LORA_MAX_RANK`` (3x that on the fused
  q/k/v projections), so the compiled graphs contain the LoRA path once. A job's adapters are
  hot-swapped into the slot
  (peft's ``hotswap_adapter_from_state_dict``, what diffusers' hotswap runs: weights copied in
  place, no recompile) with the job's scale folded into ``lora_B``, and the slot is zeroed
  after the job, which adds exactly 0.
  An adapter of higher rank than the slots is refused (``invalid_input``): a bigger tensor would
  recompile every graph in the middle of a job. The slot costs memory and per-image time on every
  job (not measured yet: no GPU so far); ``MAX_LORAS=0`` leaves them out.

The worker fuses the double-stream blocks' q/k/v projections (``speed.fuse_qkv``), while LoRAs
are trained on the unfused ``to_q``/``to_k``/``to_v``. diffusers maps adapters onto fused
projections only for LoKr, so ``_fuse_qkv`` does it here for LoRA, exactly: the fused adapter's
``lora_A`` stacks the three down-projections and its ``lora_B`` is their block diagonal (a shared
``lora_A``, as in BFL-format files, keeps its rank).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import Flux2KleinPipeline
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open

from handlers.errors import InvalidInput, JobError
from handlers.lora_files import AdapterFile

logger = logging.getLogger(__name__)

# Adapters kept loaded after their job (eager mode), and parsed adapters kept in host memory for
# the slots (hotswap mode): a style used on every other job should not be re-read each time.
MAX_RESIDENT = 4
# Keep loaded adapters only while this much GPU memory stays free for activations.
KEEP_FREE_BYTES = 2 * 1024**3
_A, _B = ".lora_A.weight", ".lora_B.weight"
SLOT = "job_loras"  # the compiled worker's one adapter slot
# Fused projection -> the unfused ones it replaced, in the order of its output rows.
_FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}

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
        weights[name + _A], weights[name + _B] = a, b
    return LoraWeights(sha256=file.sha256, state=weights, rank=max(a.shape[0] for a, _ in pairs.values()))


def _pairs(state: Mapping[str, torch.Tensor], field: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    others = [k for k in state if not k.endswith((_A, _B))]
    if others or not state:
        example = f" (e.g. {others[0]!r})" if others else ""
        raise InvalidInput(
            f"{field}: {len(others) or 'no'} tensors of the file are not LoRA A/B weights{example}; "
            "a LoRA for the FLUX.2 transformer is expected"
        )
    names = {k.removesuffix(_A).removesuffix(_B) for k in state}
    half = [n for n in names if n + _A not in state or n + _B not in state]
    if half:
        raise InvalidInput(f"{field}: layer {half[0]!r} has only one of lora_A/lora_B")
    pairs = {n: (state[n + _A], state[n + _B]) for n in sorted(names)}
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
    for fused, parts in _FUSED.items():
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


class LoraAdapters:
    """The adapters of one klein pipeline; created at boot by ``create_lora_adapters``."""

    def __init__(
        self, pipeline: Any, *, max_loras: int, max_rank: int, hotswap: bool, unsupported: str | None = None
    ) -> None:
        self.pipeline = pipeline
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.hotswap = hotswap
        self.unsupported = unsupported
        self.targets = linear_targets(pipeline.transformer)
        self._parsed: OrderedDict[str, LoraWeights] = OrderedDict()  # sha256 -> checked weights
        self._loaded: OrderedDict[str, str] = OrderedDict()  # sha256 -> adapter name (eager mode)

    def adapter_rank(self, name: str) -> int:
        """The largest rank one adapter may have on a layer of a compiled worker:
        ``LORA_MAX_RANK``, times 3 on a fused q/k/v projection (its three parts side by side)."""
        parts = _FUSED.get(name.rsplit(".", 1)[-1])
        return self.max_rank * (len(parts) if parts else 1)

    def prepare_slots(self) -> None:
        """Hotswap mode: add the all-zero slot. Call before compiling the transformer.

        One adapter slot with room for ``MAX_LORAS`` adapters side by side (their ranks stacked):
        the same arithmetic as one slot each, in half the kernel launches with two. It is created
        at its final rank, so diffusers' ``enable_lora_hotswap`` (which pads the first adapter to
        one rank everywhere, wrong for the fused layers' 3x) is not needed; nor are its scaling
        tensors: the scaling stays 1 and each job's scale is folded into ``lora_B``.
        """
        zero = {}
        for name, (fan_in, fan_out) in self.targets.items():
            rank = self.adapter_rank(name) * self.max_loras
            zero[f"transformer.{name}{_A}"] = torch.zeros(rank, fan_in)
            zero[f"transformer.{name}{_B}"] = torch.zeros(fan_out, rank)
        self.pipeline.load_lora_weights(zero, adapter_name=SLOT)
        self.pipeline.set_adapters([SLOT], [1.0])
        logger.info(
            "LoRA hotswap: a slot for %d adapter(s) of rank %d on %d layers",
            self.max_loras,
            self.max_rank,
            len(self.targets),
        )

    def read(self, files: Sequence[AdapterFile]) -> list[tuple[LoraWeights, float]]:
        """Check a job's adapter files (cached by content hash) and pair them with their scales."""
        if files and self.unsupported:
            raise InvalidInput(f"{files[0].field}: {self.unsupported}")
        checked = []
        for file in files:
            weights = self._parsed.pop(file.sha256, None) or read_adapter(file, targets=self.targets)
            self._parsed[file.sha256] = weights
            while len(self._parsed) > MAX_RESIDENT:
                self._parsed.popitem(last=False)
            if self.hotswap:
                self._check_rank(weights, file.field)
            checked.append((weights, file.scale))
        return checked

    @contextmanager
    def applied(self, files: Sequence[AdapterFile]) -> Iterator[None]:
        """The job's adapters active inside the block; none of them after it."""
        adapters = self.read(files)
        if not adapters:
            yield
            return
        if self.hotswap:
            try:
                self._swap_in(adapters)
                yield
            finally:
                self._clear_slots()
            return
        scales: dict[str, float] = {}  # the same file twice is one adapter with the summed scale
        for weights, scale in adapters:
            name = self._load(weights)
            scales[name] = scales.get(name, 0.0) + scale
        self.pipeline.enable_lora()
        try:
            self.pipeline.set_adapters(list(scales), list(scales.values()))
            yield
        finally:
            self.pipeline.disable_lora()
            self._trim()

    # -- eager mode ----------------------------------------------------------------------------

    def _load(self, weights: LoraWeights) -> str:
        name = self._loaded.pop(weights.sha256, None)
        if name is None:
            name = f"lora_{weights.sha256[:16]}"
            state = {f"transformer.{k}": v for k, v in weights.state.items()}
            self.pipeline.load_lora_weights(state, adapter_name=name)
            logger.info("LoRA %s loaded (rank %d)", name, weights.rank)
        self._loaded[weights.sha256] = name
        return name

    def _trim(self) -> None:
        while self._loaded and (len(self._loaded) > MAX_RESIDENT or not self._memory_to_spare()):
            _, name = self._loaded.popitem(last=False)
            self.pipeline.delete_adapters(name)
            logger.info("LoRA %s unloaded", name)

    def _memory_to_spare(self) -> bool:
        device = next(self.pipeline.transformer.parameters()).device
        if device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(device)
        return free >= KEEP_FREE_BYTES

    # -- hotswap mode --------------------------------------------------------------------------

    def _check_rank(self, weights: LoraWeights, field: str) -> None:
        for key, value in weights.state.items():
            name = key.removesuffix(_A)
            if key.endswith(_A) and value.shape[0] > self.adapter_rank(name):
                raise InvalidInput(
                    f"{field}: rank {value.shape[0]} on {name!r} is above this compiled worker's "
                    f"LORA_MAX_RANK={self.max_rank} (x3 on fused q/k/v projections): a larger adapter "
                    "would recompile the model during the job"
                )

    def _swap_in(self, adapters: Sequence[tuple[LoraWeights, float]]) -> None:
        """The job's adapters stacked into the slot (B1 A1 s1 + B2 A2 s2 = [B1 s1, B2 s2] [A1; A2])
        by peft's hotswap, as diffusers' ``load_lora_weights(hotswap=True)`` runs it but against
        the slot's own config: copied in place, the rest of the slot zero-filled, its scaling left
        at 1. (Through diffusers the config is derived from the new keys and must equal the
        slot's, which with the fused layers' 3x rank holds only if every layer is sent, zeros
        included: hundreds of MB per job on klein-4B.)"""
        from peft.utils.hotswap import hotswap_adapter_from_state_dict

        downs: dict[str, list[torch.Tensor]] = {}
        ups: dict[str, list[torch.Tensor]] = {}
        for weights, scale in adapters:
            for key, value in weights.state.items():
                if key.endswith(_A):
                    downs.setdefault(key.removesuffix(_A), []).append(value)
                else:
                    ups.setdefault(key.removesuffix(_B), []).append(value * scale)
        state = {}
        for name in downs:
            state[f"{name}.lora_A.{SLOT}.weight"] = torch.cat(downs[name], dim=0)
            state[f"{name}.lora_B.{SLOT}.weight"] = torch.cat(ups[name], dim=1)
        transformer = self.pipeline.transformer
        hotswap_adapter_from_state_dict(
            transformer, state, adapter_name=SLOT, config=transformer.peft_config[SLOT]
        )

    def _clear_slots(self) -> None:
        from peft.tuners.lora import LoraLayer

        with torch.no_grad():
            for module in self.pipeline.transformer.modules():
                if isinstance(module, LoraLayer) and SLOT in module.lora_A:
                    module.lora_A[SLOT].weight.zero_()
                    module.lora_B[SLOT].weight.zero_()


def create_lora_adapters(
    pipeline: Any, *, quantization: str, max_loras: int, max_rank: int, hotswap: bool
) -> LoraAdapters | None:
    """The pipeline's adapter handling, or None when ``MAX_LORAS=0``. With ``hotswap`` the slots
    are added now: call before compiling."""
    if max_loras <= 0:
        return None
    if quantization.startswith("nunchaku"):
        # nunchaku's 4-bit transformer replaces the Linear layers peft wraps; refused per job.
        return LoraAdapters(
            pipeline,
            max_loras=max_loras,
            max_rank=max_rank,
            hotswap=False,
            unsupported=f"the {quantization} transformer of this worker cannot take LoRA adapters",
        )
    adapters = LoraAdapters(pipeline, max_loras=max_loras, max_rank=max_rank, hotswap=hotswap)
    if hotswap:
        adapters.prepare_slots()
    return adapters
