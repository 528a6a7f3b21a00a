"""The simulator's modelled GPU market: GPU models with prices and throughputs, and offers that replenish.

Assumptions, not measurements. Throughput is klein-4B at 1024x1024 in 4 steps on one GPU, from the reference
figures (RTX 5090 ~1.0 s per image, H100 ~0.47 s eager) and scaled by DLPerf for the others; prices are
typical of on-demand listings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from provisioning.models import Offer


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuModel:
    name: str
    price_per_hour: float  # on-demand, typical of Vast listings
    images_per_second: float  # klein-4B, 1024x1024, 4 steps, one GPU
    gpu_ram_mb: int
    dlperf: float
    boot_s: float = 420.0  # image pull + model load to the first job (median)


CATALOG = (
    GpuModel(name="RTX 3090", price_per_hour=0.22, images_per_second=0.40, gpu_ram_mb=24576, dlperf=40),
    GpuModel(name="RTX 4090", price_per_hour=0.40, images_per_second=0.75, gpu_ram_mb=24564, dlperf=80),
    GpuModel(name="RTX 5090", price_per_hour=0.65, images_per_second=1.00, gpu_ram_mb=32607, dlperf=110),
    GpuModel(name="H100 SXM", price_per_hour=1.90, images_per_second=2.10, gpu_ram_mb=81559, dlperf=200),
)


class Market:
    """Offers for every model; renting one replaces it with a fresh offer on a new machine."""

    def __init__(
        self,
        *,
        catalog: tuple[GpuModel, ...] = CATALOG,
        per_model: int = 5,
        hosts: int = 60,
        price_jitter: float = 0.10,
        rng: random.Random,
    ) -> None:
        self._rng, self._hosts, self._jitter = rng, hosts, price_jitter
        self._ids = 0
        self.offers: dict[int, tuple[Offer, GpuModel]] = {}
        for model in catalog:
            for _ in range(per_model):
                self._list(model)

    def _list(self, model: GpuModel) -> None:
        self._ids += 1
        price = round(model.price_per_hour * (1 + self._rng.uniform(-1, 1) * self._jitter), 4)
        offer = Offer(
            id=self._ids,
            machine_id=100_000 + self._ids,
            host_id=self._rng.randrange(self._hosts),
            gpu_name=model.name,
            num_gpus=1,
            gpu_ram_mb=model.gpu_ram_mb,
            dph_total=price,
            min_bid=round(price * 0.5, 4),
            dlperf=model.dlperf,
            reliability=0.99,
            verified=True,
            cuda_max_good=13.0,
            disk_space_gb=200.0,
            inet_down_mbps=1000.0,
        )
        self.offers[offer.id] = (offer, model)

    def take(self, offer_id: int) -> tuple[Offer, GpuModel]:
        offer, model = self.offers.pop(offer_id)
        self._list(model)
        return offer, model
