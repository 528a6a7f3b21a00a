"""Replays an arrival trace against the policy, against a static fleet of the same cost, and finds the
cheapest static fleet that reaches the policy's p95 wait.

A discrete-event model (``simfleet.py``): jobs queue FIFO and go to whichever GPU frees first; rented
instances become workers after a modelled boot (some never finish booting, some run a worker that never
serves); scale-in stops instances into the cold pool, which resume in ``resume_s`` unless someone took the
GPU meanwhile. The policy is the real ``policy.decide``, called every tick with what an operator's
autoscaler would see, readiness included. GPU prices and throughputs are modelled, not
measured (``catalog.py``): the comparison says how the policy trades cost against waiting, not what a given
day costs.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from provisioning.catalog import CATALOG, GpuModel, Market
from provisioning.models import QueueSample
from provisioning.offers import OfferRequirements
from provisioning.policy import Decision, Observation, PolicyConfig, decide
from provisioning.simfleet import Box, Cluster
from provisioning.state import FleetMemory
from provisioning.throughput import ThroughputModel


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    catalog: tuple[GpuModel, ...] = CATALOG
    tick_s: float = 30.0  # the autoscale interval
    offers_per_model: int = 5
    hosts: int = 60
    boot_sigma: float = 0.25  # log-normal spread of boot times around each model's median
    stuck_probability: float = 0.03  # rents that never finish booting (bad host, sold twice)
    unhealthy_probability: float = 0.03  # rents whose container runs but whose worker never serves
    storage_per_hour: float = 0.015  # a stopped instance's disk, $/h (~60 GB at $0.18/GB-month)
    resume_s: float = 90.0  # resume to serving: container start + model load from the local disk
    resume_hang_probability: float = 0.10  # resumes that wait for a GPU someone else took meanwhile
    price_jitter: float = 0.10
    images_per_job: float = 1.0
    drain_limit_s: float = 2 * 3600.0  # after the trace, run until the queue is empty, at most this long
    seed: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SimResult:
    name: str
    jobs: int
    unserved: int  # still waiting when the run stopped (their wait so far counts in the percentiles)
    duration_s: float
    gpu_hours: float
    cost_usd: float
    wait_p50_s: float
    wait_p95_s: float
    wait_max_s: float
    max_backlog: int  # visible jobs, sampled every tick
    rents: int
    destroys: int
    peak_hourly_usd: float
    fleet_sizes: tuple[int, ...] = field(repr=False)  # live instances after each tick


Controller = Callable[[float, QueueSample, Cluster], tuple[int, int]]  # -> (rents, destroys) this tick


@dataclass(frozen=True, slots=True, kw_only=True)
class StaticFleet:
    """The cheapest static fleet whose p95 wait is at most a target."""

    result: SimResult
    size: int
    gpu: str


def _run(
    name: str, arrivals: Sequence[float], sim: SimConfig, cluster: Cluster, control: Controller
) -> SimResult:
    last = arrivals[-1] if arrivals else 0.0
    t, rents, destroys, peak, max_backlog = 0.0, 0, 0, 0.0, 0
    sizes: list[int] = []
    while True:
        cluster.run_until(t)
        sample = cluster.sample(t)
        max_backlog = max(max_backlog, sample.visible)
        if (t > last and cluster.done()) or t > last + sim.drain_limit_s:
            break
        r, d = control(t, sample, cluster)
        rents, destroys = rents + r, destroys + d
        alive = cluster.alive()
        peak = max(peak, sum(b.hourly(t) for b in alive))
        sizes.append(sum(1 for b in alive if b.stopped_at is None))
        t += sim.tick_s
    for box in cluster.alive():
        cluster.destroy(box, t)
    costs = [b.cost(t) for b in cluster.boxes]
    waits = sorted(cluster.waits + [t - a for a in cluster.queue])
    return SimResult(
        name=name,
        jobs=len(arrivals),
        unserved=len(cluster.queue),
        duration_s=t,
        gpu_hours=sum(h for h, _ in costs),
        cost_usd=sum(c for _, c in costs),
        wait_p50_s=_percentile(waits, 50),
        wait_p95_s=_percentile(waits, 95),
        wait_max_s=waits[-1] if waits else 0.0,
        max_backlog=max_backlog,
        rents=rents,
        destroys=destroys,
        peak_hourly_usd=peak,
        fleet_sizes=tuple(sizes),
    )


class _PolicyRun:
    """The operator's side of a simulated run: the autoscaler's memory, the market, and applying decisions."""

    def __init__(self, *, policy: PolicyConfig, requirements: OfferRequirements, sim: SimConfig) -> None:
        self.policy, self.requirements, self.sim = policy, requirements, sim
        self.rng = random.Random(sim.seed)
        self.market = Market(
            catalog=sim.catalog,
            per_model=sim.offers_per_model,
            hosts=sim.hosts,
            price_jitter=sim.price_jitter,
            rng=self.rng,
        )
        self.throughput = ThroughputModel(profiles={m.name: m.images_per_second for m in sim.catalog})
        self.memory = FleetMemory()
        self.rented: Counter[str] = Counter()

    def control(self, t: float, sample: QueueSample, cl: Cluster) -> tuple[int, int]:
        memory = self.memory
        memory.remember(sample, keep_s=self.policy.scale_in_after_s)
        alive = {b.id for b in cl.alive()}
        memory.last_ready = {k: v for k, v in memory.last_ready.items() if k in alive}
        for iid in cl.ready(t):
            memory.last_ready[iid] = t
        memory.resumed = {
            k: v for k, v in memory.resumed.items() if k in alive and memory.last_ready.get(k, -1.0) < v
        }
        obs = Observation(
            now=t,
            samples=list(memory.samples),
            instances=cl.instances(t, self.policy.image),
            offers=[o for o, _ in self.market.offers.values()],
            avoid=memory.avoid,
            resumed=dict(memory.resumed),
            cold_since=dict(memory.cold_since),
            last_ready=dict(memory.last_ready),
        )
        decision = decide(obs, config=self.policy, requirements=self.requirements, throughput=self.throughput)
        memory.avoid = dict(decision.avoid)
        return self._apply(decision, t, cl), len(decision.destroys)

    def _apply(self, decision: Decision, t: float, cl: Cluster) -> int:
        by_id = {b.id: b for b in cl.alive()}
        for d in decision.destroys:
            cl.destroy(by_id[d.instance.id], t)
            self.memory.cold_since.pop(d.instance.id, None)
        for inst in decision.stops:
            cl.stop(by_id[inst.id], t)
            self.memory.cold_since[inst.id] = t
            self.memory.last_ready.pop(inst.id, None)
        for inst in decision.resumes:
            hangs = self.rng.random() < self.sim.resume_hang_probability
            cl.resume(by_id[inst.id], t, resume_s=self.sim.resume_s, hangs=hangs)
            self.memory.resumed[inst.id] = t
            self.memory.cold_since.pop(inst.id, None)
        for item in decision.rents:
            cl.add(self._rent(item.offer.id, item.price, t, len(cl.boxes) + 1))
        return len(decision.rents)

    def _rent(self, offer_id: int, price: float, t: float, box_id: int) -> Box:
        offer, model = self.market.take(offer_id)
        stuck = self.rng.random() < self.sim.stuck_probability
        unhealthy = self.rng.random() < self.sim.unhealthy_probability
        up = t + model.boot_s * self.rng.lognormvariate(0.0, self.sim.boot_sigma)
        self.rented[model.name] += 1
        return Box(
            id=box_id,
            model=model,
            price=price,
            storage_price=self.sim.storage_per_hour,
            machine_id=offer.machine_id,
            host_id=offer.host_id,
            rented_at=t,
            running_at=None if stuck else up,
            ready_at=None if stuck or unhealthy else up,
        )


def simulate_policy(
    arrivals: Sequence[float], *, policy: PolicyConfig, requirements: OfferRequirements, sim: SimConfig
) -> tuple[SimResult, Counter[str]]:
    """Run the policy over the trace; also return how many of each GPU model it rented."""
    run = _PolicyRun(policy=policy, requirements=requirements, sim=sim)
    cluster = Cluster(arrivals, images_per_job=sim.images_per_job)
    return _run("policy", arrivals, sim, cluster, run.control), run.rented


def simulate_static(arrivals: Sequence[float], *, model: GpuModel, count: int, sim: SimConfig) -> SimResult:
    """``count`` instances of ``model``, warm from the start and never changed."""
    cluster = Cluster(arrivals, images_per_job=sim.images_per_job)
    for k in range(count):
        cluster.add(
            Box(
                id=k + 1,
                model=model,
                price=model.price_per_hour,
                storage_price=sim.storage_per_hour,
                machine_id=k,
                host_id=k,
                rented_at=0.0,
                running_at=0.0,
                ready_at=0.0,
            )
        )
    return _run(f"static {count}x {model.name}", arrivals, sim, cluster, lambda t, s, c: (0, 0))


def compare(
    arrivals: Sequence[float], *, policy: PolicyConfig, requirements: OfferRequirements, sim: SimConfig
) -> tuple[SimResult, SimResult]:
    """The policy, and a static fleet of its most-rented GPU model sized to cost the same over the run."""
    result, rented = simulate_policy(arrivals, policy=policy, requirements=requirements, sim=sim)
    by_name = {m.name: m for m in sim.catalog}
    if rented:
        model = by_name[rented.most_common(1)[0][0]]
    else:
        model = min(sim.catalog, key=lambda m: m.price_per_hour / m.images_per_second)
    hours = max(result.duration_s, sim.tick_s) / 3600.0
    count = max(1, round(result.cost_usd / (model.price_per_hour * hours)))
    return result, simulate_static(arrivals, model=model, count=count, sim=sim)


def cheapest_static(
    arrivals: Sequence[float], *, wait_p95_s: float, sim: SimConfig, max_size: int = 64
) -> StaticFleet:
    """The cheapest static fleet (one GPU model, whole instances) whose p95 wait is <= ``wait_p95_s``;
    the largest tried when none reaches it. The p95 only falls as a fleet grows: a binary search per model."""
    best: StaticFleet | None = None
    for model in sim.catalog:
        lo, hi = 1, max_size
        while lo < hi:
            mid = (lo + hi) // 2
            if simulate_static(arrivals, model=model, count=mid, sim=sim).wait_p95_s <= wait_p95_s:
                hi = mid
            else:
                lo = mid + 1
        result = simulate_static(arrivals, model=model, count=lo, sim=sim)
        found = StaticFleet(result=result, size=lo, gpu=model.name)
        if best is None or _better(found, best, wait_p95_s):
            best = found
    assert best is not None, "the catalog is empty"
    return best


def _better(a: StaticFleet, b: StaticFleet, target: float) -> bool:
    a_ok, b_ok = a.result.wait_p95_s <= target, b.result.wait_p95_s <= target
    if a_ok != b_ok:
        return a_ok
    return a.result.cost_usd < b.result.cost_usd if a_ok else a.result.wait_p95_s < b.result.wait_p95_s


def _percentile(ordered: Sequence[float], pct: float) -> float:
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]
