"""The scaling policy: pure decisions on built fleets, and closed-loop runs under step, burst and noise."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from provisioning.models import Instance, Offer, PendingRent, Phase, QueueSample
from provisioning.offers import OfferRequirements
from provisioning.policy import Observation, PolicyConfig, decide
from provisioning.simulate import SimConfig, simulate_policy
from provisioning.throughput import ThroughputModel
from provisioning.traces import generate

IMAGE = "ghcr.io/acme/klein-worker:1.0"
NOW = 1_000_000.0
THROUGHPUT = ThroughputModel(profiles={"RTX 4090": 0.75, "RTX 3090": 0.4})
REQUIREMENTS = OfferRequirements(max_price_per_gpu_hour=1.0)
CONFIG = PolicyConfig(image=IMAGE, min_instances=0, max_instances=10, target_wait_s=120, max_hourly_usd=10)


def inst(iid: int, *, status: str | None = "running", age: float = 3600, dph: float = 0.4, **kw) -> Instance:
    fields: dict[str, Any] = dict(
        id=iid,
        label="klein",
        image=IMAGE,
        machine_id=iid * 10,
        host_id=iid * 100,
        gpu_name="RTX 4090",
        num_gpus=1,
        dph_total=dph,
        actual_status=status,
        intended_status="running",
        status_msg="",
        started_at=NOW - age,
    )
    fields.update(kw)
    return Instance(**fields)


def offer(oid: int, *, price: float = 0.4, gpu: str = "RTX 4090", **kw) -> Offer:
    fields: dict[str, Any] = dict(
        id=oid,
        machine_id=oid * 7,
        host_id=oid * 11,
        gpu_name=gpu,
        num_gpus=1,
        gpu_ram_mb=24564,
        dph_total=price,
        min_bid=price / 2,
        dlperf=80.0,
        reliability=0.995,
        verified=True,
        cuda_max_good=13.0,
        disk_space_gb=200.0,
        inet_down_mbps=900.0,
    )
    fields.update(kw)
    return Offer(**fields)


def steady(visible: int, in_flight: int, *, span: float = 900, step: float = 30) -> list[QueueSample]:
    n = int(span / step)
    return [QueueSample(at=NOW - span + k * step, visible=visible, in_flight=in_flight) for k in range(n + 1)]


def run(samples, instances=(), offers=None, config=CONFIG, **kw):
    obs = Observation(
        now=NOW,
        samples=samples,
        instances=list(instances),
        offers=offers if offers is not None else [offer(k) for k in range(1, 20)],
        **kw,
    )
    return decide(obs, config=config, requirements=REQUIREMENTS, throughput=THROUGHPUT)


def test_desired_is_backlog_over_throughput_times_target_wait():
    d = run(steady(300, 0))
    # 300 / (0.75 jobs/s x 120 s) = 3.33 -> 4
    assert d.desired == 4
    assert len(d.rents) == 4 and "= 3.33" in d.reason


def test_desired_is_clamped_to_min_and_max():
    assert run(steady(0, 0), config=dataclasses.replace(CONFIG, min_instances=2)).desired == 2
    assert run(steady(100_000, 0), config=dataclasses.replace(CONFIG, max_instances=5)).desired == 5


def test_booting_instances_count_as_capacity():
    booting = [inst(k, status="loading", age=60) for k in range(1, 5)]
    d = run(steady(300, 0), booting)
    assert d.capacity == 4 and d.rents == () and d.destroys == ()


def test_scale_out_is_rate_limited():
    d = run(steady(2000, 0))
    assert d.desired == 10 and len(d.rents) == CONFIG.max_rents_per_tick
    assert any("rate limit" in n for n in d.notes)


def test_rents_stay_within_the_hourly_cap():
    config = dataclasses.replace(CONFIG, max_hourly_usd=1.0)
    assert len(run(steady(2000, 0), config=config).rents) == 2  # 2 x $0.40 fits, a third does not
    running = [inst(1, dph=0.9)]
    assert run(steady(2000, 0), running, config=config).rents == ()


def test_budget_is_never_exceeded_on_random_observations():
    rng = random.Random(7)
    statuses = ["running", "loading", None, "exited", "offline", "stopped", "unknown"]
    for _ in range(300):
        cap = rng.choice([0.5, 1.0, 2.5, 5.0])
        fleet = [
            inst(k, status=rng.choice(statuses), age=rng.uniform(0, 5000), dph=rng.uniform(0.1, 1.0))
            for k in range(1, rng.randint(0, 8) + 1)
        ]
        offers = [offer(k, price=rng.uniform(0.1, 1.2)) for k in range(100, 100 + rng.randint(0, 15))]
        config = dataclasses.replace(CONFIG, max_hourly_usd=cap, min_instances=rng.randint(0, 3))
        d = run(steady(rng.randint(0, 3000), rng.randint(0, 10)), fleet, offers, config=config)
        assert d.hourly_after <= cap + 1e-9
        assert len({r.offer.machine_id for r in d.rents}) == len(d.rents)


def test_over_the_cap_destroys_down_to_it():
    fleet = [inst(k, dph=0.5) for k in range(1, 5)]  # $2.00/h
    d = run(steady(500, 4), fleet, config=dataclasses.replace(CONFIG, max_hourly_usd=1.2))
    assert [x.reason for x in d.destroys] == ["over_budget", "over_budget"]
    assert d.hourly_after <= 1.2


def test_no_scale_in_before_the_surplus_has_lasted():
    fleet = [inst(k) for k in range(1, 5)]
    short = [QueueSample(at=NOW - 100, visible=0, in_flight=0), QueueSample(at=NOW, visible=0, in_flight=0)]
    d = run(short, fleet)
    assert d.destroys == () and any("waiting" in n for n in d.notes)
    recent_spike = (
        steady(0, 0)[:-3] + [QueueSample(at=NOW - 60, visible=900, in_flight=4)] + steady(0, 0)[-2:]
    )
    assert run(recent_spike, fleet).destroys == ()
    assert {x.reason for x in run(steady(0, 0), fleet).destroys} == {"scale_in"}
    stale = [
        QueueSample(at=NOW - 86_400, visible=0, in_flight=0),
        QueueSample(at=NOW, visible=0, in_flight=0),
    ]
    assert run(stale, fleet).destroys == ()  # a sample from yesterday does not make a sustained surplus


def test_scale_in_takes_booting_first_and_spares_young_running_instances():
    fleet = [inst(1), inst(2), inst(3, status="loading", age=120), inst(4, age=60)]  # 4: running, too young
    d = run(steady(0, 0), fleet)
    ids = [x.instance.id for x in d.destroys]
    assert ids[0] == 3 and sorted(ids) == [1, 2, 3]  # the booting one first; 4 is too young to go
    d = run(steady(0, 0), fleet, config=dataclasses.replace(CONFIG, min_instances=2))
    assert [x.instance.id for x in d.destroys][0] == 3 and len(d.destroys) == 2


def test_busy_fleet_is_not_shrunk_while_a_backlog_stands():
    fleet = [inst(k) for k in range(1, 7)]
    # The backlog alone asks for ceil((30 + 6) / 90) = 1 instance, but all six workers are busy.
    d = run(steady(30, 6), fleet)
    assert d.desired == 6 and d.destroys == ()
    two_gpu = [inst(k, num_gpus=2, dph=0.8) for k in range(1, 4)]
    d = run(steady(5, 6), two_gpu)
    assert d.destroys == ()


@pytest.mark.parametrize(
    ("status", "extra", "reason"),
    [
        ("loading", {"age": 5000}, Phase.STUCK),
        (None, {"age": 5000}, Phase.STUCK),
        ("exited", {}, Phase.EXITED),
        ("offline", {}, Phase.OFFLINE),
        ("unknown", {}, Phase.OFFLINE),
        ("stopped", {"is_bid": True}, Phase.OUTBID),
        ("stopped", {"status_msg": "outbid by a higher bid"}, Phase.OUTBID),
        ("stopped", {}, Phase.STOPPED),
    ],
)
def test_failed_instances_are_destroyed_replaced_and_their_machine_avoided(status, extra, reason):
    bad = inst(1, status=status, **extra)
    offers = [offer(1, machine_id=bad.machine_id, price=0.1), offer(2)]  # the cheap one is on the bad machine
    d = run(steady(0, 1), [bad], offers, config=dataclasses.replace(CONFIG, min_instances=1))
    assert [(x.instance.id, x.reason) for x in d.destroys] == [(1, str(reason))]
    assert d.avoid[bad.machine_id] == NOW + CONFIG.avoid_machine_s
    assert [r.offer.id for r in d.rents] == [2]


def test_avoided_machines_expire():
    offers = [offer(1)]
    assert run(steady(90, 0), offers=offers, avoid={offers[0].machine_id: NOW + 10}).rents == ()
    assert len(run(steady(90, 0), offers=offers, avoid={offers[0].machine_id: NOW - 1}).rents) == 1


def test_unknown_labelled_instances_are_reported_not_touched():
    stranger = inst(9, image="nginx:latest", dph=0.3)
    d = run(steady(0, 0), [stranger])
    assert d.unknown == (stranger,) and d.destroys == () and 9 not in d.phases
    assert d.hourly_now == pytest.approx(0.3)


def test_offers_are_ranked_by_cost_per_image_and_spread_over_hosts():
    offers = [
        offer(1, price=0.30, host_id=1),
        offer(2, price=0.30, host_id=1),
        offer(3, price=0.31, host_id=1),
        offer(4, price=0.45, host_id=2),
        offer(5, price=0.20, gpu="RTX 3090", host_id=3),  # $0.139/1k images vs $0.111 for offer 1
        offer(6, price=0.50, gpu="RTX 3090", host_id=4),
    ]
    d = run(steady(300, 0), offers=offers, config=dataclasses.replace(CONFIG, max_per_host=2))
    assert [r.offer.id for r in d.rents] == [1, 5, 4, 6]  # new hosts first, in cost order
    config = dataclasses.replace(CONFIG, max_per_host=2, max_rents_per_tick=6)
    d = run(steady(600, 0), offers=offers, config=config)
    assert [r.offer.id for r in d.rents] == [1, 5, 4, 6, 2]  # then a second per host; never a third
    assert any("host spread" in n for n in d.notes)


def test_interruptible_bids_above_min_bid_within_the_cap():
    requirements = dataclasses.replace(REQUIREMENTS, interruptible=True, max_price_per_gpu_hour=0.21)
    assert requirements.price(offer(1, price=0.4, min_bid=0.10)) == pytest.approx(0.11)
    assert requirements.price(offer(1, price=0.4, min_bid=0.20)) == pytest.approx(0.21)
    assert requirements.price(offer(1, price=0.4, min_bid=0.25)) is None
    assert requirements.to_query()["type"] == "bid"


def test_pending_rent_counts_until_it_shows_up():
    pending = PendingRent(
        offer_id=5,
        machine_id=35,
        dph_total=0.4,
        num_gpus=1,
        gpu_name="RTX 4090",
        requested_at=NOW - 30,
        expires_at=NOW + 600,
    )
    d = run(steady(90, 0), pending=[pending])
    assert d.capacity == 1 and d.rents == () and d.hourly_now == pytest.approx(0.4)
    arrived = inst(1, status="loading", age=20, machine_id=35)
    assert run(steady(90, 0), [arrived], pending=[pending]).pending == ()
    expired = dataclasses.replace(pending, expires_at=NOW - 1)
    assert len(run(steady(90, 0), pending=[expired]).rents) == 1


def test_manual_size_ignores_the_surplus_window_and_age():
    fleet = [inst(1, age=30), inst(2, age=30), inst(3, age=30)]
    config = dataclasses.replace(CONFIG, min_instances=1, max_instances=1, manual=True)
    d = run([QueueSample(at=NOW, visible=500, in_flight=3)], fleet, config=config)
    assert d.desired == 1 and len(d.destroys) == 2


# -- closed loop: the real policy against the simulator's model of boots and GPUs ----------------------

LOOP = dataclasses.replace(CONFIG, max_instances=20, max_hourly_usd=6.0)


def _reversals(sizes: tuple[int, ...]) -> int:
    """How often the fleet size changed direction (up then down, or down then up)."""
    moves = [b - a for a, b in zip(sizes, sizes[1:], strict=False) if b != a]
    return sum(1 for a, b in zip(moves, moves[1:], strict=False) if (a > 0) != (b > 0))


def test_noisy_steady_load_settles_without_oscillating():
    rng, t, arrivals = random.Random(3), 0.0, []
    while t < 3 * 3600:
        t += rng.expovariate(1.5)
        arrivals.append(t)
    result, _ = simulate_policy(arrivals, policy=LOOP, requirements=REQUIREMENTS, sim=SimConfig(seed=3))
    assert result.unserved == 0
    settled = result.fleet_sizes[len(result.fleet_sizes) // 3 :]
    assert _reversals(settled) <= 1
    assert max(settled) - min(settled) <= 2
    assert result.peak_hourly_usd <= LOOP.max_hourly_usd + 1e-9


def test_step_load_scales_out_keeps_up_then_scales_in():
    arrivals = generate("step", duration_s=3 * 3600, seed=1)  # 0.2 -> 2.0 -> 0.2 jobs/s
    result, _ = simulate_policy(arrivals, policy=LOOP, requirements=REQUIREMENTS, sim=SimConfig(seed=1))
    sizes, per_hour = result.fleet_sizes, int(3600 / 30)
    high = sizes[int(1.25 * per_hour) : int(2.25 * per_hour)]  # the high phase, once the step is absorbed
    assert min(high) >= 3  # 2.0 jobs/s needs at least three 0.75 img/s GPUs: never shrunk below that
    assert sizes[-1] <= 2 < max(high)
    assert result.unserved == 0 and result.wait_p95_s < 600
    assert result.peak_hourly_usd <= LOOP.max_hourly_usd + 1e-9


def test_bursts_are_absorbed_within_the_budget():
    config = dataclasses.replace(LOOP, max_hourly_usd=3.0)
    arrivals = generate("burst", duration_s=3 * 3600, seed=2)
    result, _ = simulate_policy(arrivals, policy=config, requirements=REQUIREMENTS, sim=SimConfig(seed=2))
    assert result.unserved == 0
    assert result.peak_hourly_usd <= 3.0 + 1e-9
    assert max(result.fleet_sizes) >= 6  # each burst is met with a scale-out...
    assert result.fleet_sizes[-1] <= 2  # ...and the fleet goes back down afterwards
