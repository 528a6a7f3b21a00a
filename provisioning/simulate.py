"""Replays an arrival trace against the policy, and against a static fleet of the same cost.

A discrete-event model: jobs queue FIFO and go to whichever GPU frees first; rented instances become
workers after a modelled boot (some never finish booting); a destroyed instance finishes the job in hand
(the SIGTERM drain) and takes no more. The policy is the real ``policy.decide``, called every tick with
what an operator's autoscaler would see. GPU prices and throughputs are modelled, not
measured (``catalog.py``): the comparison says how the policy trades cost against waiting, not what a given
day costs.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from provisioning.catalog import CATALOG, GpuModel, Market
from provisioning.models import Instance, QueueSample
from provisioning.offers import OfferRequirements
from provisioning.policy import Observation, PolicyConfig, decide
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


@dataclass(slots=True, kw_only=True)
class _Box:
    id: int
    model: GpuModel
    price: float
    machine_id: int
    host_id: int
    rented_at: float
    ready_at: float | None  # None: stuck, never boots
    destroyed_at: float | None = None


class _Cluster:
    """Jobs and GPUs over time."""

    def __init__(self, arrivals: Sequence[float], *, images_per_job: float) -> None:
        self._arrivals = arrivals
        self._next = 0
        self._images = images_per_job
        self.queue: deque[float] = deque()
        self._workers: list[tuple[float, int, _Box]] = []  # (free at, tie-break, instance)
        self._in_service: list[float] = []  # end times
        self._seq = 0
        self.waits: list[float] = []
        self.boxes: list[_Box] = []

    def add(self, box: _Box) -> None:
        self.boxes.append(box)
        if box.ready_at is not None:
            self._seq += 1
            heapq.heappush(self._workers, (box.ready_at, self._seq, box))

    def run_until(self, t1: float) -> None:
        """Serve jobs FIFO with whichever worker frees first, for every start before ``t1``."""
        while True:
            if not self.queue:
                if self._next < len(self._arrivals) and self._arrivals[self._next] < t1:
                    self.queue.append(self._arrivals[self._next])
                    self._next += 1
                else:
                    break
            # Destroys happen at ticks and time only moves forward: a destroyed box never starts a job again.
            while self._workers and self._workers[0][2].destroyed_at is not None:
                heapq.heappop(self._workers)
            if not self._workers:
                break
            free_at, _, box = self._workers[0]
            start = max(free_at, self.queue[0])
            if start >= t1:
                break
            heapq.heappop(self._workers)
            self.waits.append(start - self.queue.popleft())
            end = start + self._images / box.model.images_per_second
            self._seq += 1
            heapq.heappush(self._workers, (end, self._seq, box))
            heapq.heappush(self._in_service, end)
        while self._next < len(self._arrivals) and self._arrivals[self._next] < t1:
            self.queue.append(self._arrivals[self._next])
            self._next += 1

    def sample(self, t: float) -> QueueSample:
        while self._in_service and self._in_service[0] <= t:
            heapq.heappop(self._in_service)
        return QueueSample(at=t, visible=len(self.queue), in_flight=len(self._in_service))

    def done(self) -> bool:
        return self._next >= len(self._arrivals) and not self.queue and not self._in_service

    def alive(self) -> list[_Box]:
        return [b for b in self.boxes if b.destroyed_at is None]

    def instances(self, t: float, image: str) -> list[Instance]:
        return [
            Instance(
                id=b.id,
                label="sim",
                image=image,
                machine_id=b.machine_id,
                host_id=b.host_id,
                gpu_name=b.model.name,
                num_gpus=1,
                dph_total=b.price,
                actual_status="running" if b.ready_at is not None and b.ready_at <= t else "loading",
                intended_status="running",
                status_msg="",
                started_at=b.rented_at,
                dlperf=b.model.dlperf,
            )
            for b in self.alive()
        ]


Controller = Callable[[float, QueueSample, _Cluster], tuple[int, int]]  # -> (rents, destroys) this tick


def _run(
    name: str, arrivals: Sequence[float], sim: SimConfig, cluster: _Cluster, control: Controller
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
        peak = max(peak, sum(b.price for b in alive))
        sizes.append(len(alive))
        t += sim.tick_s
    for box in cluster.alive():
        box.destroyed_at = t
    # Vast bills the GPU from "running" to destroy; the disk charge while loading is left out (cents a day).
    hours = [
        max(0.0, (b.destroyed_at or t) - b.ready_at) / 3600.0 if b.ready_at is not None else 0.0
        for b in cluster.boxes
    ]
    waits = sorted(cluster.waits + [t - a for a in cluster.queue])
    return SimResult(
        name=name,
        jobs=len(arrivals),
        unserved=len(cluster.queue),
        duration_s=t,
        gpu_hours=sum(hours),
        cost_usd=sum(h * b.price for h, b in zip(hours, cluster.boxes, strict=True)),
        wait_p50_s=_percentile(waits, 50),
        wait_p95_s=_percentile(waits, 95),
        wait_max_s=waits[-1] if waits else 0.0,
        max_backlog=max_backlog,
        rents=rents,
        destroys=destroys,
        peak_hourly_usd=peak,
        fleet_sizes=tuple(sizes),
    )


def simulate_policy(
    arrivals: Sequence[float], *, policy: PolicyConfig, requirements: OfferRequirements, sim: SimConfig
) -> tuple[SimResult, Counter[str]]:
    """Run the policy over the trace; also return how many of each GPU model it rented."""
    rng = random.Random(sim.seed)
    market = Market(
        catalog=sim.catalog,
        per_model=sim.offers_per_model,
        hosts=sim.hosts,
        price_jitter=sim.price_jitter,
        rng=rng,
    )
    cluster = _Cluster(arrivals, images_per_job=sim.images_per_job)
    throughput = ThroughputModel(profiles={m.name: m.images_per_second for m in sim.catalog})
    memory = FleetMemory()
    rented: Counter[str] = Counter()

    def control(t: float, sample: QueueSample, cl: _Cluster) -> tuple[int, int]:
        memory.remember(sample, keep_s=policy.scale_in_after_s)
        offers = [o for o, _ in market.offers.values()]
        obs = Observation(
            now=t,
            samples=list(memory.samples),
            instances=cl.instances(t, policy.image),
            offers=offers,
            avoid=memory.avoid,
        )
        decision = decide(obs, config=policy, requirements=requirements, throughput=throughput)
        memory.avoid = dict(decision.avoid)
        gone = {d.instance.id for d in decision.destroys}
        for box in cl.boxes:
            if box.id in gone:
                box.destroyed_at = t
        for item in decision.rents:
            offer, model = market.take(item.offer.id)
            stuck = rng.random() < sim.stuck_probability
            boot = model.boot_s * rng.lognormvariate(0.0, sim.boot_sigma)
            cl.add(
                _Box(
                    id=len(cl.boxes) + 1,
                    model=model,
                    price=item.price,
                    machine_id=offer.machine_id,
                    host_id=offer.host_id,
                    rented_at=t,
                    ready_at=None if stuck else t + boot,
                )
            )
            rented[model.name] += 1
        return len(decision.rents), len(gone)

    return _run("policy", arrivals, sim, cluster, control), rented


def simulate_static(arrivals: Sequence[float], *, model: GpuModel, count: int, sim: SimConfig) -> SimResult:
    """``count`` instances of ``model``, warm from the start and never changed."""
    cluster = _Cluster(arrivals, images_per_job=sim.images_per_job)
    for k in range(count):
        cluster.add(
            _Box(
                id=k + 1,
                model=model,
                price=model.price_per_hour,
                machine_id=k,
                host_id=k,
                rented_at=0.0,
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


def _percentile(ordered: Sequence[float], pct: float) -> float:
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]
