"""The scaling policy: a pure function of (queue samples, fleet, offers, clock) to a decision.

No I/O and no clock reads: the caller passes ``now`` and everything observed, and applies the decision
(``reconcile.py`` against Vast, ``simulate.py`` against a model). Memory between calls (machines to avoid,
rents of unknown outcome) goes in and comes back out as data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from provisioning.models import (
    Instance,
    Offer,
    PendingRent,
    Phase,
    QueueSample,
    classify,
    same_image,
    started,
)
from provisioning.offers import OfferRequirements, RankedOffer, pick_offers, rank_offers
from provisioning.throughput import ThroughputModel

_PENDING_MATCH_SLACK_S = 120.0  # clock skew between us and Vast when matching a late rent to its instance


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    image: str  # the worker image: labelled instances running anything else are "unknown"
    min_instances: int = 0
    max_instances: int = 10
    target_wait_s: float = 120.0
    max_hourly_usd: float = 5.0
    scale_in_after_s: float = 300.0  # a surplus must last this long before anything is destroyed
    min_instance_age_s: float = 600.0  # running instances younger than this are never scaled in
    boot_deadline_s: float = 1200.0  # still loading after this long: destroy and replace
    avoid_machine_s: float = 3600.0  # how long a failed instance's machine is not rented again
    max_rents_per_tick: int = 4  # scale-out rate limit
    max_per_host: int = 2
    images_per_job: float = 1.0  # average images per job (batches), to turn images/s into jobs/s
    manual: bool = False  # `scale --to N`: no surplus window, no age or busy guard


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    now: float
    samples: Sequence[QueueSample]  # oldest first; the last is the current one; empty without a queue
    instances: Sequence[Instance]  # every instance carrying the fleet label
    offers: Sequence[Offer]
    avoid: Mapping[int, float] = field(default_factory=dict)  # machine id -> avoid until (epoch s)
    pending: Sequence[PendingRent] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Destroy:
    instance: Instance
    reason: str  # a Phase value for failures, "scale_in" or "over_budget"


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    desired: int
    reason: str
    phases: Mapping[int, Phase]  # managed instance id -> phase
    capacity: int  # booting + running + pending rents, before this decision
    destroys: tuple[Destroy, ...]
    rents: tuple[RankedOffer, ...]
    alternates: tuple[RankedOffer, ...]  # next-best offers, for a rent that finds its offer gone
    unknown: tuple[Instance, ...]
    avoid: Mapping[int, float]
    pending: tuple[PendingRent, ...]
    hourly_now: float  # $/h of everything carrying the label, plus pending rents
    hourly_after: float  # after the destroys and rents
    notes: tuple[str, ...] = ()


def target_size(sample: QueueSample, *, jobs_per_s: float, gpus: float, config: PolicyConfig) -> int:
    """clamp(max(ceil(backlog / (jobs/s per instance x target wait)), instances busy now), min, max)."""
    drain = math.ceil(sample.backlog / (jobs_per_s * config.target_wait_s) - 1e-9) if sample.backlog else 0
    # Workers holding messages are busy: keep at least that many instances, or a fleet that has just caught
    # up with a steady load would look like a surplus and shrink, and the backlog would build again.
    busy = _busy_instances(sample.in_flight, gpus)
    return max(config.min_instances, min(config.max_instances, max(drain, busy)))


def _busy_instances(in_flight: int, gpus: float) -> int:
    """Instances whose workers are all holding a message (one worker per GPU)."""
    return math.ceil(in_flight / max(gpus, 1.0) - 1e-9)


@dataclass(slots=True, kw_only=True)
class _Fleet:
    """What the observation says about the fleet, before any scaling."""

    live: list[Instance]  # booting or running: capacity
    running: list[Instance]
    phases: dict[int, Phase]
    failed: list[Destroy]
    avoid: dict[int, float]
    pending: list[PendingRent]
    hourly_now: float

    @property
    def capacity(self) -> int:
        return len(self.live) + len(self.pending)


def decide(
    obs: Observation, *, config: PolicyConfig, requirements: OfferRequirements, throughput: ThroughputModel
) -> Decision:
    notes: list[str] = []
    fleet = _observe(obs, config)
    ranked = rank_offers(
        obs.offers, requirements=requirements, throughput=throughput, avoid_machines=fleet.avoid
    )
    jobs_per_s, gpus = _reference_instance(fleet.live, ranked, throughput, config)

    def size(s: QueueSample) -> int:
        return target_size(s, jobs_per_s=jobs_per_s, gpus=gpus, config=config)

    current = obs.samples[-1] if obs.samples else None
    desired = size(current) if current else config.min_instances
    destroys = list(fleet.failed)
    if desired < fleet.capacity:
        keep = (
            desired
            if config.manual
            else _sustained(obs.samples, size, obs.now, config, fleet.capacity, notes)
        )
        if not config.manual and current is not None and _all_busy(current, fleet.running):
            notes.append("backlog stands and every running worker is busy: not scaling in")
            keep = fleet.capacity
        surplus = _scale_in_order(fleet, throughput, obs.now, config)
        destroys += [Destroy(instance=i, reason="scale_in") for i in surplus[: max(0, fleet.capacity - keep)]]
    hourly_after = _fit_budget(fleet, destroys, throughput, obs.now, config, notes)

    remaining = fleet.capacity - sum(1 for d in destroys if fleet.phases[d.instance.id].is_capacity)
    want = min(desired, config.max_instances) - remaining
    rents = _scale_out(fleet, ranked, want, config.max_hourly_usd - hourly_after, config, notes)
    picked = {r.offer.id for r in rents}
    return Decision(
        desired=desired,
        reason=_explain(current, desired, jobs_per_s=jobs_per_s, gpus=gpus, config=config),
        phases=fleet.phases,
        capacity=fleet.capacity,
        destroys=tuple(destroys),
        rents=tuple(rents),
        alternates=tuple(r for r in ranked if r.offer.id not in picked)[: 2 * len(rents)],
        unknown=tuple(i for i in obs.instances if not same_image(i.image, config.image)),
        avoid=fleet.avoid,
        pending=tuple(fleet.pending),
        hourly_now=fleet.hourly_now,
        hourly_after=hourly_after + sum(r.price for r in rents),
        notes=tuple(notes),
    )


def _observe(obs: Observation, config: PolicyConfig) -> _Fleet:
    now = obs.now
    managed = [i for i in obs.instances if same_image(i.image, config.image)]
    phases = {i.id: classify(i, now=now, boot_deadline_s=config.boot_deadline_s) for i in managed}
    failed = [Destroy(instance=i, reason=str(phases[i.id])) for i in managed if not phases[i.id].is_capacity]
    avoid = {m: t for m, t in obs.avoid.items() if t > now}
    for d in failed:
        if d.instance.machine_id is not None:
            avoid[d.instance.machine_id] = now + config.avoid_machine_s
    live = [i for i in managed if phases[i.id].is_capacity]
    pending = _live_pending(obs.pending, managed, now)
    return _Fleet(
        live=live,
        running=[i for i in live if phases[i.id] is Phase.RUNNING],
        phases=phases,
        failed=failed,
        avoid=avoid,
        pending=pending,
        hourly_now=sum(i.dph_total for i in obs.instances) + sum(p.dph_total for p in pending),
    )


def _reference_instance(
    live: Sequence[Instance], ranked: Sequence[RankedOffer], throughput: ThroughputModel, config: PolicyConfig
) -> tuple[float, float]:
    """(jobs/s, GPUs) of an average instance: the fleet's, else the best offer's, else the default."""
    per_instance = [throughput.for_instance(i).images_per_second for i in live]
    gpus = [float(max(1, i.num_gpus)) for i in live]
    if not per_instance and ranked:
        per_instance, gpus = [ranked[0].estimate.images_per_second], [float(max(1, ranked[0].offer.num_gpus))]
    if not per_instance:
        per_instance, gpus = (
            [throughput.estimate(gpu_name="", num_gpus=1, dlperf=None).images_per_second],
            [1.0],
        )
    ips = sum(per_instance) / len(per_instance)
    return ips / config.images_per_job, sum(gpus) / len(gpus)


def _fit_budget(
    fleet: _Fleet,
    destroys: list[Destroy],
    throughput: ThroughputModel,
    now: float,
    config: PolicyConfig,
    notes: list[str],
) -> float:
    """Add destroys until the fleet's $/h is within the cap (a lowered cap, a price rise); return the $/h."""
    cap = config.max_hourly_usd + 1e-9
    hourly = fleet.hourly_now - sum(d.instance.dph_total for d in destroys)
    gone = {d.instance.id for d in destroys}
    for inst in _scale_in_order(fleet, throughput, now, config, any_age=True):
        if hourly <= cap:
            break
        if inst.id not in gone:
            destroys.append(Destroy(instance=inst, reason="over_budget"))
            hourly -= inst.dph_total
    if hourly > cap:
        notes.append(f"${hourly:.2f}/h is over the cap and nothing more of ours can go")
    return hourly


def _scale_out(
    fleet: _Fleet,
    ranked: Sequence[RankedOffer],
    want: int,
    budget: float,
    config: PolicyConfig,
    notes: list[str],
) -> list[RankedOffer]:
    if want <= 0:
        return []
    count = min(want, config.max_rents_per_tick)
    if want > count:
        notes.append(f"renting {count} of {want} now (rate limit)")
    hosts: dict[int, int] = {}
    for i in fleet.live:
        if i.host_id is not None:
            hosts[i.host_id] = hosts.get(i.host_id, 0) + 1
    rents = pick_offers(
        ranked,
        count,
        host_counts=hosts,
        max_per_host=config.max_per_host,
        budget_usd_per_hour=budget,
        busy_machines={i.machine_id for i in fleet.live if i.machine_id is not None}
        | {p.machine_id for p in fleet.pending},
    )
    if len(rents) < count:
        why = "no matching offers" if not ranked else "the $/h cap or the host spread"
        notes.append(f"only {len(rents)} of {count} rents possible: {why}")
    return rents


def _live_pending(
    pending: Sequence[PendingRent], managed: Sequence[Instance], now: float
) -> list[PendingRent]:
    """Pending rents that have neither expired nor turned up as an instance on their machine."""

    def arrived(p: PendingRent) -> bool:
        return any(
            i.machine_id == p.machine_id and started(i, now) >= p.requested_at - _PENDING_MATCH_SLACK_S
            for i in managed
        )

    return [p for p in pending if p.expires_at > now and not arrived(p)]


def _sustained(
    samples: Sequence[QueueSample],
    size: Callable[[QueueSample], int],
    now: float,
    config: PolicyConfig,
    capacity: int,
    notes: list[str],
) -> int:
    """The largest target over the last ``scale_in_after_s``; no shrink until history covers it."""
    start = now - config.scale_in_after_s
    # The last sample at or before the window start counts too (it held until the window began), but one
    # from long before (the autoscaler was stopped for a day) says nothing about the window.
    before = [k for k, s in enumerate(samples) if start - config.scale_in_after_s <= s.at <= start]
    if not before:
        notes.append(
            f"surplus: waiting for {config.scale_in_after_s:.0f}s of queue history before scaling in"
        )
        return capacity
    return max(size(s) for s in samples[before[-1] :])


def _all_busy(sample: QueueSample, running: Sequence[Instance]) -> bool:
    slots = sum(max(1, i.num_gpus) for i in running)
    return sample.visible > 0 and slots > 0 and sample.in_flight >= slots


def _scale_in_order(
    fleet: _Fleet, throughput: ThroughputModel, now: float, config: PolicyConfig, *, any_age: bool = False
) -> list[Instance]:
    """Booting instances first (they hold no work; youngest first), then running ones old enough, worst
    cost per image first."""
    booting = sorted(
        (i for i in fleet.live if fleet.phases[i.id] is Phase.BOOTING), key=lambda i: -started(i, now)
    )
    min_age = 0.0 if (any_age or config.manual) else config.min_instance_age_s
    running = [i for i in fleet.running if now - started(i, now) >= min_age]

    def cost(i: Instance) -> float:
        return i.dph_total / max(throughput.for_instance(i).images_per_second, 1e-9)

    return booting + sorted(running, key=lambda i: (-cost(i), -started(i, now)))


def _explain(
    sample: QueueSample | None, desired: int, *, jobs_per_s: float, gpus: float, config: PolicyConfig
) -> str:
    if config.manual:
        return f"fixed at {desired} by `scale --to`"
    if sample is None:
        return f"no queue sample: the minimum, {desired}"
    raw = sample.backlog / (jobs_per_s * config.target_wait_s)
    busy = _busy_instances(sample.in_flight, gpus)
    return (
        f"backlog {sample.backlog} (visible {sample.visible} + in flight {sample.in_flight}) / "
        f"({jobs_per_s:.2f} jobs/s per instance x {config.target_wait_s:.0f}s target wait) = {raw:.2f}; "
        f"instances busy now: {busy}; within [{config.min_instances}, {config.max_instances}] -> {desired}"
    )
