"""The scaling policy: a pure function of (queue samples, fleet, offers, clock) to a decision.

No I/O and no clock reads: the caller passes ``now`` and everything observed, and applies the decision
(``reconcile.py`` against Vast, ``simulate.py`` against a model). Memory between calls (machines to avoid,
rents of unknown outcome) goes in and comes back out as data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from provisioning import coldpool
from provisioning.fleetview import Destroy, Fleet, observe
from provisioning.models import (
    Instance,
    PendingRent,
    Phase,
    QueueSample,
    same_image,
    started,
)
from provisioning.offers import OfferRequirements, RankedOffer, pick_offers, rank_offers
from provisioning.policy_inputs import Observation, PolicyConfig
from provisioning.sizing import all_busy, explain, reference_instance, sustained, target_size
from provisioning.throughput import ThroughputModel


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
    stops: tuple[Instance, ...] = ()  # into the cold pool
    resumes: tuple[Instance, ...] = ()  # out of the cold pool, before any rent
    image_hold: str = ""  # why rents of this image are held (Observation.image_hold, or seen now)


def decide(
    obs: Observation, *, config: PolicyConfig, requirements: OfferRequirements, throughput: ThroughputModel
) -> Decision:
    notes: list[str] = []
    fleet = observe(obs, config)
    ranked = rank_offers(
        obs.offers, requirements=requirements, throughput=throughput, avoid_machines=fleet.avoid
    )
    jobs_per_s, gpus = reference_instance(fleet.live, ranked, throughput, config)

    def size(s: QueueSample) -> int:
        return target_size(s, jobs_per_s=jobs_per_s, gpus=gpus, config=config)

    current = obs.samples[-1] if obs.samples else None
    desired = size(current) if current else config.min_instances
    destroys = list(fleet.failed)
    worst_first = _cost_key(throughput)
    for inst, why in coldpool.expired(
        fleet.cold,
        cold_since=obs.cold_since,
        now=obs.now,
        max_age_s=config.cold_max_age_s,
        # Beyond what the pool could ever grow to; below that it shrinks by age (the stopped instances are
        # the memory of the last peak: a burst every 90 minutes finds its fleet still stopped).
        pool_size=coldpool.pool_ceiling(
            config.cold_pool, config.cold_mult, max_instances=config.max_instances
        ),
        worst_first=worst_first,
    ):
        destroys.append(Destroy(instance=inst, reason=why))
    stops: list[Instance] = []
    if desired < fleet.capacity:
        keep = (
            desired if config.manual else sustained(obs.samples, size, obs.now, config, fleet.capacity, notes)
        )
        if not config.manual and current is not None and all_busy(current, fleet.running):
            notes.append("backlog stands and every running worker is busy: not scaling in")
            keep = fleet.capacity
        leaving = _scale_in_order(fleet, throughput, obs.now, config)[: max(0, fleet.capacity - keep)]
        expiring = len(destroys) - len(fleet.failed)
        # Relative to the fleet before it shrinks: stopping a burst's fleet keeps it for the next burst.
        pool = coldpool.pool_size(
            config.cold_pool, config.cold_mult, live=len(fleet.live), max_instances=config.max_instances
        )
        room = pool - (len(fleet.cold) - expiring)
        # `scale --to` is one call: a booting instance kept to stop later would never be stopped.
        stops, scrap = coldpool.split_scale_in(
            leaving, phases=fleet.phases, room=room, keep_booting=not config.manual
        )
        destroys += [Destroy(instance=i, reason="scale_in") for i in scrap]
    hourly_after = _fit_budget(fleet, destroys, stops, throughput, obs.now, config, notes)

    leaving_ids = {d.instance.id for d in destroys} | {i.id for i in stops}
    remaining = fleet.capacity - sum(1 for i in fleet.live if i.id in leaving_ids)
    want = min(desired, config.max_instances) - remaining
    resumes = coldpool.pick_resumes(
        [i for i in fleet.cold if i.id not in leaving_ids],
        max(0, want),
        budget_usd_per_hour=config.max_hourly_usd - hourly_after,
        avoid=fleet.avoid,
        best_first=worst_first,
    )
    hourly_after += sum(coldpool.resume_cost(i) for i in resumes)
    budget = config.max_hourly_usd - hourly_after
    if want <= 0 and not config.manual and config.fill_cold_pool:
        cold_after = len(fleet.cold) + len(stops) - sum(1 for d in destroys if d.instance in fleet.cold)
        want = min(
            # Rents fill the floor only: filling to cold_mult x the fleet would rent (and store) for peaks
            # that may never come; stops grow the pool to the peaks that did.
            coldpool.to_fill(config.cold_pool, cold=cold_after, live=remaining),
            config.max_instances - remaining,
        )
        if want > 0:
            notes.append(f"filling the cold pool: {want} more to boot, then stop")
    # Another rent would pull the same image and fail the same way: hold every rent until the image
    # changes (the hold is kept per image) or an operator clears it (`autoscale --retry-image`).
    hold = next(
        (i.status_msg for i in obs.instances if fleet.phases.get(i.id) is Phase.UNPULLABLE), obs.image_hold
    )
    if hold:
        notes.append(
            f"rents held: the image {config.image} cannot be pulled ({hold[:200]}); held until the "
            "image changes or `autoscale --retry-image` after fixing it"
        )
        want = len(resumes)  # resumes only: their disks hold the image already
    rents = _scale_out(fleet, ranked, want - len(resumes), budget, config, notes)
    picked = {r.offer.id for r in rents}
    return Decision(
        desired=desired,
        reason=explain(current, desired, jobs_per_s=jobs_per_s, gpus=gpus, config=config),
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
        stops=tuple(stops),
        resumes=tuple(resumes),
        image_hold=hold,
    )


def _fit_budget(
    fleet: Fleet,
    destroys: list[Destroy],
    stops: list[Instance],
    throughput: ThroughputModel,
    now: float,
    config: PolicyConfig,
    notes: list[str],
) -> float:
    """Add destroys until the fleet's $/h is within the cap (a lowered cap, a price rise); return the $/h.
    Cold instances go first: they bill their disk and serve nothing."""
    cap = config.max_hourly_usd + 1e-9
    hourly = fleet.hourly_now - sum(d.instance.hourly_cost for d in destroys)
    hourly -= sum(coldpool.resume_cost(i) for i in stops)
    gone = {d.instance.id for d in destroys}
    for inst in fleet.cold + _scale_in_order(fleet, throughput, now, config, any_age=True):
        if hourly <= cap:
            break
        if inst.id not in gone:
            if inst in stops:
                stops.remove(inst)  # destroyed instead of stopped: its disk bills nothing either
                hourly += coldpool.resume_cost(inst)
            destroys.append(Destroy(instance=inst, reason="over_budget"))
            gone.add(inst.id)
            hourly -= inst.hourly_cost
    if hourly > cap:
        notes.append(f"${hourly:.2f}/h is over the cap and nothing more of ours can go")
    return hourly


def _scale_out(
    fleet: Fleet,
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


def _scale_in_order(
    fleet: Fleet, throughput: ThroughputModel, now: float, config: PolicyConfig, *, any_age: bool = False
) -> list[Instance]:
    """Booting instances first (they hold no work; youngest first), then running ones old enough, worst
    cost per image first. For `scale --to`, resuming ones come first: a one-off call must put them back
    (autoscale waits a tick: they run, or hang and are replaced)."""
    booting = sorted(
        (i for i in fleet.live if fleet.phases[i.id] is Phase.BOOTING), key=lambda i: -started(i, now)
    )
    if config.manual:
        booting = [i for i in fleet.live if fleet.phases[i.id] is Phase.RESUMING] + booting
    min_age = 0.0 if (any_age or config.manual) else config.min_instance_age_s
    running = [i for i in fleet.running if now - started(i, now) >= min_age]

    cost = _cost_key(throughput)
    return booting + sorted(running, key=lambda i: (-cost(i), -started(i, now)))


def _cost_key(throughput: ThroughputModel) -> Callable[[Instance], float]:
    """$/h per image/s when running: lower is better."""
    return lambda i: i.dph_total / max(throughput.for_instance(i).images_per_second, 1e-9)
