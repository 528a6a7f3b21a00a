"""Images per second per GPU model: from benchmark profiles when present (``profile_figures.py``),
else estimated from DLPerf.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from provisioning.models import Instance, Offer

log = logging.getLogger(__name__)

# A rough, uncalibrated estimate: klein-4B 1024x1024 in 4 steps runs at about 0.01 image/s per Vast DLPerf
# point (RTX 3090 ~40 DLPerf ~0.4 img/s, RTX 4090 ~80 ~0.75 img/s, H100 SXM ~200 ~2 img/s). Benchmark
# profiles replace it for every GPU model they cover.
DLPERF_IMAGES_PER_SECOND = 0.01
# Used when neither a profile nor a DLPerf score is known (an instance whose GPU no profile covers).
DEFAULT_IMAGES_PER_SECOND = 0.5


def normalize_gpu_name(name: str) -> str:
    """``NVIDIA GeForce RTX 4090`` and Vast's ``RTX 4090`` both become ``rtx4090``."""
    lowered = re.sub(r"\b(nvidia|geforce)\b", " ", name.lower())
    return re.sub(r"[^a-z0-9]", "", lowered)


def gpu_model_token(name: str) -> str | None:
    """The model number (``h100``, ``4090``, ``a6000``): NVML and Vast spell the rest differently."""
    for token in re.split(r"[\s_\-]+", name.lower()):
        if re.search(r"\d", token) and not re.fullmatch(r"\d+gb", token):
            return token
    return None


@dataclass(frozen=True, slots=True)
class Estimate:
    images_per_second: float  # the whole instance (all its GPUs)
    source: str  # "profile", "dlperf estimate" or "default estimate"


class ThroughputModel:
    """Throughput of an offer or an instance, from profiles first, then DLPerf, then a default."""

    def __init__(
        self,
        *,
        profiles: Mapping[str, float] | None = None,
        dlperf_images_per_second: float = DLPERF_IMAGES_PER_SECOND,
        default_images_per_second: float = DEFAULT_IMAGES_PER_SECOND,
    ) -> None:
        self._exact = {normalize_gpu_name(k): v for k, v in (profiles or {}).items()}
        tokens: dict[str, list[float]] = {}
        for name, ips in (profiles or {}).items():
            if (token := gpu_model_token(name)) is not None:
                tokens.setdefault(token, []).append(ips)
        # A model token shared by profiles with different figures (H100 PCIe vs SXM) is ambiguous: unused.
        self._by_token = {t: v[0] for t, v in tokens.items() if len(set(v)) == 1}
        self._dlperf_factor = dlperf_images_per_second
        self._default = default_images_per_second

    def per_gpu_profile(self, gpu_name: str) -> float | None:
        exact = self._exact.get(normalize_gpu_name(gpu_name))
        if exact is not None:
            return exact
        token = gpu_model_token(gpu_name)
        return self._by_token.get(token) if token else None

    def estimate(self, *, gpu_name: str, num_gpus: int, dlperf: float | None) -> Estimate:
        gpus = max(1, num_gpus)
        profiled = self.per_gpu_profile(gpu_name)
        if profiled is not None:
            return Estimate(profiled * gpus, "profile")
        if dlperf is not None and dlperf > 0:
            return Estimate(dlperf * self._dlperf_factor, "dlperf estimate")
        return Estimate(self._default * gpus, "default estimate")

    def for_offer(self, offer: Offer) -> Estimate:
        return self.estimate(gpu_name=offer.gpu_name, num_gpus=offer.num_gpus, dlperf=offer.dlperf)

    def for_instance(self, instance: Instance) -> Estimate:
        return self.estimate(gpu_name=instance.gpu_name, num_gpus=instance.num_gpus, dlperf=instance.dlperf)
