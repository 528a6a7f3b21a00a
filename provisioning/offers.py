"""Which offers the fleet may rent, what each would cost per image, and which to take (pure)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from klein_facts.variants import card_gb_by_variant
from provisioning.models import Offer
from provisioning.throughput import Estimate, ThroughputModel

# Card GB to rent per worker variant ("klein-4b-fp8", or "klein-9b" for its default quantization):
# klein_facts.variants.VRAM_NEEDS, beside the free memory the worker itself asks for at boot.
VARIANT_MIN_VRAM_GB = card_gb_by_variant()
# Offers per search: wide enough that the price-per-hour order of the market cannot hide a fast card.
OFFER_QUERY_LIMIT = 1000
# Vast's gpu_ram is in MB and a "24 GB" card reports ~24564: count a GB as 1000 MB so such cards pass.
MB_PER_GB = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class OfferRequirements:
    """Filters on offers; the same rules go to the API query and are re-checked on every reply."""

    min_vram_gb: float = VARIANT_MIN_VRAM_GB["klein-4b"]
    min_reliability: float = 0.98
    verified: bool = True
    # The default image's torch is a CUDA 12.8 build (Dockerfile CUDA_FLAVOUR): the driver must support 12.8.
    min_cuda: float = 12.8
    min_disk_gb: float = 40.0
    min_inet_down_mbps: float = 200.0
    max_gpus: int = 1
    gpu_names: tuple[str, ...] = ()  # an allow-list in Vast's spelling ("RTX 4090"); empty: any
    max_price_per_gpu_hour: float | None = None
    interruptible: bool = False
    bid_margin: float = (
        0.10  # bid this much above the offer's min_bid, so the next small bid does not evict us
    )

    def to_query(self, *, limit: int = OFFER_QUERY_LIMIT) -> dict[str, Any]:
        """The ``POST /api/v0/bundles/`` body: ``{"field": {"op": value}}`` filters plus order/type/limit.

        Ordered by DLPerf per dollar, not by $/h: the fleet ranks by cost per image, and the 100 cheapest
        per hour are mostly slow cards, which would cut the best cost-per-image offers from the reply.
        """
        query: dict[str, Any] = {
            "gpu_ram": {"gte": int(self.min_vram_gb * MB_PER_GB)},
            # The offer rows carry "reliability" and "reliability2"; the current `vastai search offers`
            # filters and shows "reliability" (older clients mapped it to "reliability2"). Filter on
            # the field vastrows.parse_offer reads.
            "reliability": {"gte": self.min_reliability},
            "cuda_max_good": {"gte": self.min_cuda},
            "disk_space": {"gte": self.min_disk_gb},
            "inet_down": {"gte": self.min_inet_down_mbps},
            "num_gpus": {"gte": 1, "lte": self.max_gpus},
            "rentable": {"eq": True},
            "rented": {"eq": False},
            "external": {"eq": False},
            "order": [["dlperf_per_dphtotal", "desc"]],
            "type": "bid" if self.interruptible else "on-demand",
            "allocated_storage": self.min_disk_gb,
            "limit": limit,
        }
        if self.verified:
            query["verified"] = {"eq": True}
        if self.gpu_names:
            query["gpu_name"] = {"in": list(self.gpu_names)}
        return query

    def price(self, offer: Offer) -> float | None:
        """$/h renting ``offer`` would cost (the bid when interruptible); None when over the cap."""
        cap = None if self.max_price_per_gpu_hour is None else self.max_price_per_gpu_hour * offer.num_gpus
        if not self.interruptible:
            return offer.dph_total if cap is None or offer.dph_total <= cap else None
        if offer.min_bid is None or offer.min_bid <= 0:
            return None
        bid = offer.min_bid * (1.0 + self.bid_margin)
        if cap is not None:
            if offer.min_bid > cap:
                return None
            bid = min(bid, cap)
        return round(bid, 4)

    def accepts(self, offer: Offer) -> bool:
        allowed = {n.lower() for n in self.gpu_names}
        return (
            offer.gpu_ram_mb >= self.min_vram_gb * MB_PER_GB
            and offer.reliability >= self.min_reliability
            and (offer.verified or not self.verified)
            and offer.cuda_max_good >= self.min_cuda
            and offer.disk_space_gb >= self.min_disk_gb
            and offer.inet_down_mbps >= self.min_inet_down_mbps
            and 1 <= offer.num_gpus <= self.max_gpus
            and (not allowed or offer.gpu_name.lower() in allowed)
            and self.price(offer) is not None
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RankedOffer:
    offer: Offer
    price: float  # $/h we would pay
    estimate: Estimate

    @property
    def cost_per_1k_images(self) -> float:
        """Estimated $ per 1000 images at full utilisation: price / throughput."""
        return self.price / (self.estimate.images_per_second * 3.6)


def rank_offers(
    offers: Iterable[Offer],
    *,
    requirements: OfferRequirements,
    throughput: ThroughputModel,
    avoid_machines: Collection[int] = (),
) -> list[RankedOffer]:
    """Acceptable offers, cheapest estimated cost per image first (one per offer id)."""
    ranked: dict[int, RankedOffer] = {}
    for offer in offers:
        price = requirements.price(offer)
        if price is None or offer.machine_id in avoid_machines or not requirements.accepts(offer):
            continue
        estimate = throughput.for_offer(offer)
        if estimate.images_per_second > 0:
            ranked[offer.id] = RankedOffer(offer=offer, price=price, estimate=estimate)
    return sorted(ranked.values(), key=lambda r: (r.cost_per_1k_images, -r.offer.reliability, r.offer.id))


def pick_offers(
    ranked: Iterable[RankedOffer],
    count: int,
    *,
    host_counts: Mapping[int, int],
    max_per_host: int,
    budget_usd_per_hour: float,
    busy_machines: Collection[int] = (),
) -> list[RankedOffer]:
    """Take up to ``count`` offers in rank order, spread over hosts, within the $/h budget left.

    Hosts are filled in rounds (first hosts the fleet does not use yet, then second instances...), so one
    bad host takes out as little of the fleet as possible; at most one rent per machine per decision.
    """
    candidates = list(ranked)
    hosts = dict(host_counts)
    machines = set(busy_machines)
    budget = budget_usd_per_hour
    picked: list[RankedOffer] = []
    for round_limit in range(max_per_host):
        for item in candidates:
            if len(picked) >= count:
                return picked
            offer = item.offer
            if offer.machine_id in machines or hosts.get(offer.host_id, 0) > round_limit:
                continue
            if item.price > budget + 1e-9:
                continue
            picked.append(item)
            machines.add(offer.machine_id)
            hosts[offer.host_id] = hosts.get(offer.host_id, 0) + 1
            budget -= item.price
    return picked
