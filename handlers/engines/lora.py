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

Reading and checking an adapter file (and mapping it onto the fused q/k/v projections) is
``handlers.engines.lora_weights``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from handlers.engines.lora_weights import (
    FUSED_PROJECTIONS,
    LORA_A,
    LORA_B,
    LoraWeights,
    linear_targets,
    read_adapter,
)
from handlers.errors import InvalidInput
from handlers.lora_files import AdapterFile
from klein_facts.variants import GIB

logger = logging.getLogger(__name__)

# Adapters kept loaded after their job (eager mode), and parsed adapters kept in host memory for
# the slots (hotswap mode): a style used on every other job should not be re-read each time.
MAX_RESIDENT = 4
# Keep loaded adapters only while this much GPU memory stays free for activations.
KEEP_FREE_BYTES = 2 * GIB
SLOT = "job_loras"  # the compiled worker's one adapter slot


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
        parts = FUSED_PROJECTIONS.get(name.rsplit(".", 1)[-1])
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
            zero[f"transformer.{name}{LORA_A}"] = torch.zeros(rank, fan_in)
            zero[f"transformer.{name}{LORA_B}"] = torch.zeros(fan_out, rank)
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
            name = key.removesuffix(LORA_A)
            if key.endswith(LORA_A) and value.shape[0] > self.adapter_rank(name):
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
                if key.endswith(LORA_A):
                    downs.setdefault(key.removesuffix(LORA_A), []).append(value)
                else:
                    ups.setdefault(key.removesuffix(LORA_B), []).append(value * scale)
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
