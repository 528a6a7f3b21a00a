"""The cold pool against the fake Vast server: stop on scale-in, resume before renting, hung resumes."""

from __future__ import annotations

import dataclasses

import pytest

from provisioning.models import Phase, QueueSample
from provisioning.offers import OfferRequirements
from provisioning.policy import Decision, Observation, PolicyConfig, decide
from provisioning.reconcile import Reconciler
from provisioning.throughput import ThroughputModel
from provisioning.vast import LaunchSpec, VastClient
from tests.fake_vast import IMAGE, FakeVast

SPEC = LaunchSpec(image=IMAGE, label="klein", env={"QUEUE_URL": "https://sqs.example/q"})
POLICY = PolicyConfig(
    image=IMAGE,
    max_instances=4,
    max_hourly_usd=2.0,
    target_wait_s=120,
    scale_in_after_s=0,
    min_instance_age_s=0,
    cold_pool=2,
    fill_cold_pool=False,  # filling has its own test
)
THROUGHPUT = ThroughputModel(profiles={"RTX 4090": 0.75, "RTX 3090": 0.4})


def plan(client: VastClient, *, visible: int, now: float, config=POLICY, **memory) -> Decision:
    obs = Observation(
        now=now,
        samples=[QueueSample(at=now, visible=visible, in_flight=0)],
        instances=client.list_instances(label="klein"),
        offers=client.search_offers(OfferRequirements().to_query()),
        **memory,
    )
    return decide(obs, config=config, requirements=OfferRequirements(), throughput=THROUGHPUT)


def apply(client: VastClient, decision: Decision, cap: float = 2.0):
    return Reconciler(client=client, launch=SPEC, max_hourly_usd=cap).apply(decision, dry_run=False)


def running(fake: FakeVast, gpu: str = "RTX 4090", dph: float = 0.4) -> int:
    return fake.add_instance(
        label="klein", image_uuid=IMAGE, actual_status="running", gpu_name=gpu, dph_total=dph
    )


def test_scale_in_stops_the_best_into_the_pool_and_destroys_beyond_it(fake, client):
    slow = running(fake, gpu="RTX 3090", dph=0.4)  # the worst cost per image
    fast = [running(fake), running(fake)]
    decision = plan(client, visible=0, now=fake.clock())
    assert {i.id for i in decision.stops} == set(fast)
    assert [(d.instance.id, d.reason) for d in decision.destroys] == [(slow, "scale_in")]
    report = apply(client, decision)
    assert sorted(report.stopped) == sorted(fast) and slow not in fake.instances
    assert all(fake.instances[i]["actual_status"] == "stopped" for i in fast)
    # Stopped: never capacity, billed for the disk alone, and they show as "cold".
    after = plan(client, visible=0, now=fake.clock())
    assert after.capacity == 0 and {after.phases[i] for i in fast} == {Phase.COLD}
    assert after.hourly_now == pytest.approx(2 * 0.01) and after.destroys == () and after.stops == ()


def test_scale_out_resumes_before_renting(fake, client):
    fake.add_offer(dph_total=0.30)
    cold = [running(fake), running(fake)]
    apply(client, plan(client, visible=0, now=fake.clock()))
    decision = plan(client, visible=200, now=fake.clock())  # wants 3: two resumes, one rent
    assert {i.id for i in decision.resumes} == set(cold) and len(decision.rents) == 1
    report = apply(client, decision)
    assert sorted(report.resumed) == sorted(cold)
    assert [a.kind for a in report.actions] == ["resume", "resume", "rent"]
    assert all(fake.instances[i]["intended_status"] == "running" for i in cold)
    puts = [r for r in fake.requests if r[0] == "PUT" and r[1].startswith("/api/v0/instances/")]
    assert [r[2] for r in puts][-2:] == [{"state": "running"}] * 2


def test_a_resume_that_hangs_is_destroyed_and_replaced_by_a_rent(fake, client):
    offer = fake.add_offer(dph_total=0.30)
    iid = running(fake)
    apply(client, plan(client, visible=0, now=fake.clock()))
    fake.gpu_taken.add(iid)  # someone else rented the GPU meanwhile
    t0 = fake.clock()
    resume = plan(client, visible=50, now=t0)
    assert [i.id for i in resume.resumes] == [iid] and resume.rents == ()
    apply(client, resume)
    assert fake.instances[iid]["actual_status"] == "scheduling"
    waiting = plan(client, visible=50, now=t0 + 60, resumed={iid: t0})
    assert waiting.phases[iid] is Phase.RESUMING and waiting.capacity == 1 and waiting.rents == ()
    hung = plan(client, visible=50, now=t0 + POLICY.resume_deadline_s + 1, resumed={iid: t0})
    assert [(d.instance.id, d.reason) for d in hung.destroys] == [(iid, "resume_hung")]
    assert [r.offer.id for r in hung.rents] == [offer]
    assert fake.instances[iid]["machine_id"] in hung.avoid
    apply(client, hung)
    assert iid not in fake.instances and len(fake.rent_bodies) == 1


def test_cold_instances_past_the_max_age_or_beyond_the_pool_are_destroyed(fake, client):
    ids = [running(fake) for _ in range(3)]
    for iid in ids:
        client.set_state(iid, "stopped")
    now = fake.clock()
    old = {ids[0]: now - POLICY.cold_max_age_s - 1, ids[1]: now - 60, ids[2]: now - 60}
    decision = plan(client, visible=0, now=now, cold_since=old)
    assert [(d.instance.id, d.reason) for d in decision.destroys] == [(ids[0], "cold_too_old")]
    smaller = dataclasses.replace(POLICY, cold_pool=1)
    decision = plan(client, visible=0, now=now, config=smaller, cold_since={i: now for i in ids})
    assert sorted(d.reason for d in decision.destroys) == ["cold_pool_full"] * 2
    apply(client, decision)
    assert len(fake.instances) == 1


def test_cold_mult_stops_a_whole_burst_fleet_and_keeps_it_beyond_the_floor(fake, client):
    ids = [running(fake) for _ in range(4)]
    fixed = plan(client, visible=0, now=fake.clock())  # cold_pool 2, no cold_mult: half is destroyed
    assert len(fixed.stops) == 2 and len(fixed.destroys) == 2
    relative = dataclasses.replace(POLICY, cold_mult=1.0)  # a pool of 1x the live fleet, floor 2
    decision = plan(client, visible=0, now=fake.clock(), config=relative)
    assert sorted(i.id for i in decision.stops) == sorted(ids) and decision.destroys == ()
    apply(client, decision)
    # Nothing live now, yet the pool is not cut to its floor: the next burst resumes all four.
    now = fake.clock()
    idle = plan(client, visible=0, now=now, config=relative, cold_since={i: now for i in ids})
    assert idle.destroys == () and idle.rents == () and idle.capacity == 0
    burst = plan(client, visible=400, now=now, config=relative, cold_since={i: now for i in ids})
    assert sorted(i.id for i in burst.resumes) == sorted(ids) and burst.rents == ()
    # Age still empties it; and it never holds more than max_instances (here 4) beyond the floor.
    old = {i: now - POLICY.cold_max_age_s - 1 for i in ids}
    assert len(plan(client, visible=0, now=now, config=relative, cold_since=old).destroys) == 4
    fifth = running(fake)
    client.set_state(fifth, "stopped")
    full = plan(client, visible=0, now=now, config=relative, cold_since={i: now for i in [*ids, fifth]})
    assert [d.reason for d in full.destroys] == ["cold_pool_full"]


def test_storage_of_the_pool_counts_in_the_cap(fake, client):
    fake.add_offer(dph_total=0.40)
    iid = running(fake)
    fake.instances[iid]["storage_total_cost"] = 0.05
    client.set_state(iid, "stopped")
    fake.instances[iid]["machine_id"] = 1  # its machine is avoided: it cannot be resumed
    cap = dataclasses.replace(POLICY, max_hourly_usd=0.42)
    decision = plan(client, visible=50, now=fake.clock(), config=cap, avoid={1: fake.clock() + 600})
    assert decision.hourly_now == pytest.approx(0.05)
    assert decision.resumes == () and decision.rents == ()  # 0.05 + 0.40 > 0.42
    assert any("cap" in n for n in decision.notes)
    roomier = dataclasses.replace(POLICY, max_hourly_usd=0.45)
    assert len(plan(client, visible=50, now=fake.clock(), config=roomier, avoid={1: 1e12}).rents) == 1


def test_an_idle_fleet_fills_the_pool_boots_then_stops_what_it_rented(fake, client):
    for _ in range(3):
        fake.add_offer()
    filling = dataclasses.replace(POLICY, fill_cold_pool=True, min_instance_age_s=600)
    t0 = fake.clock()
    first = plan(client, visible=0, now=t0, config=filling)
    assert len(first.rents) == 2 and any("filling the cold pool" in n for n in first.notes)
    apply(client, first)
    # Booting: surplus to the (empty) demand, but not destroyed: they stay until they run.
    booting = plan(client, visible=0, now=t0 + 60, config=filling)
    assert booting.destroys == () and booting.rents == () and booting.stops == ()
    fake.boot_all()
    ready = plan(client, visible=0, now=t0 + 601, config=filling)
    assert len(ready.stops) == 2 and ready.destroys == () and ready.rents == ()
    apply(client, ready)
    assert {r["actual_status"] for r in fake.instances.values()} == {"stopped"}
    assert plan(client, visible=0, now=t0 + 700, config=filling).rents == ()  # full: nothing more
    # Never more live instances than max_instances, whatever the pool size.
    for iid in list(fake.instances):
        client.destroy_instance(iid)
    capped = dataclasses.replace(filling, cold_pool=5, max_instances=1)
    assert len(plan(client, visible=0, now=t0 + 800, config=capped).rents) == 1
