"""The Vast client and the reconciler against a fake Vast API on loopback (real HTTP, no mocks)."""

from __future__ import annotations

import time

import pytest

from provisioning.models import PendingRent, QueueSample
from provisioning.offers import OfferRequirements, RankedOffer
from provisioning.policy import Observation, PolicyConfig, decide
from provisioning.reconcile import Reconciler
from provisioning.throughput import Estimate, ThroughputModel
from provisioning.vast import CreateOutcome, LaunchSpec, VastClient, VastError
from tests.fake_vast import IMAGE, FakeVast

SPEC = LaunchSpec(
    image=IMAGE,
    label="klein",
    env={"QUEUE_URL": "https://sqs.example/q", "AWS_SECRET_ACCESS_KEY": "s3cr3t"},
    disk_gb=40,
    image_login="-u bot -p ghp_token ghcr.io",
)


@pytest.fixture
def sleeps():
    return []


@pytest.fixture
def client(fake, sleeps):
    return VastClient(
        api_key=fake.api_key, api_url=fake.url, backoff_s=0.01, sleep=sleeps.append, create_timeout_s=0.5
    )


def ranked(client: VastClient, offer_id: int, price: float = 0.4) -> RankedOffer:
    offer = next(o for o in client.search_offers(OfferRequirements().to_query()) if o.id == offer_id)
    return RankedOffer(offer=offer, price=price, estimate=Estimate(0.75, "profile"))


def test_search_sends_filters_with_gpu_ram_in_mb_and_parses_offers(fake, client):
    big = fake.add_offer(gpu_ram=24564, dph_total=0.35)
    fake.add_offer(gpu_ram=16376)  # a 16 GB card: below klein-4B BF16's 24 GB
    fake.add_offer(reliability=0.9)
    fake.add_offer(verified=False)
    offers = client.search_offers(OfferRequirements().to_query())
    assert [o.id for o in offers] == [big]
    o = offers[0]
    assert (o.gpu_ram_mb, o.dph_total, o.reliability, o.verified, o.dlperf) == (
        24564,
        0.35,
        0.995,
        True,
        80.0,
    )
    query = fake.requests[-1][2]
    assert query["gpu_ram"] == {"gte": 24000} and query["verified"] == {"eq": True}
    assert query["rentable"] == {"eq": True} and query["type"] == "on-demand"


def test_instance_list_follows_pages_and_keeps_to_the_label(fake, client):
    ours = [fake.add_instance(label="klein") for _ in range(5)]
    fake.add_instance(label="other-fleet")
    listed = client.list_instances(label="klein")
    assert [i.id for i in listed] == ours
    pages = [r for r in fake.requests if r[0] == "GET"]
    assert len(pages) == 3  # page size 2: 2 + 2 + 1
    assert len(client.list_instances()) == 6


def test_429_without_retry_after_is_retried_with_growing_backoff(fake, client, sleeps):
    fake.add_offer()
    fake.rate_limit(3)
    assert len(client.search_offers(OfferRequirements().to_query())) == 1
    assert len(sleeps) == 3 and sleeps[0] < sleeps[1] < sleeps[2]


def test_429_beyond_the_attempts_is_an_error(fake, sleeps):
    fake.rate_limit(100)
    quick = VastClient(
        api_key=fake.api_key, api_url=fake.url, max_attempts=3, backoff_s=0.0, sleep=sleeps.append
    )
    with pytest.raises(VastError) as err:
        quick.list_instances(label="klein")
    assert err.value.status == 429


def test_wrong_key_is_an_error(fake):
    with pytest.raises(VastError) as err:
        VastClient(api_key="nope", api_url=fake.url).list_instances()
    assert err.value.status == 401


def test_rent_sends_the_launch_spec(fake, client):
    offer_id = fake.add_offer()
    result = client.create_instance(offer_id, SPEC, price=0.22)
    assert result.outcome is CreateOutcome.RENTED and result.instance_id in fake.instances
    body = fake.rent_bodies[0]
    assert body["env"] == dict(SPEC.env)  # a JSON object, not a "-e K=V" string
    assert body["image"] == IMAGE and body["label"] == "klein" and body["runtype"] == "args"
    assert body["image_login"] == "-u bot -p ghp_token ghcr.io" and body["price"] == 0.22
    assert body["cancel_unavail"] is True
    assert "s3cr3t" not in repr(SPEC) and "ghp_token" not in repr(SPEC)


def test_error_reply_that_carries_new_contract_counts_as_rented(fake, client):
    offer_id = fake.add_offer()
    fake.error_but_rent(offer_id)
    result = client.create_instance(offer_id, SPEC)
    assert result.outcome is CreateOutcome.RENTED and result.instance_id in fake.instances


def test_create_that_times_out_is_not_retried(fake, client):
    offer_id = fake.add_offer()
    fake.slow_create(offer_id, 1.5)
    result = client.create_instance(offer_id, SPEC)
    assert result.outcome is CreateOutcome.UNKNOWN
    assert sum(1 for r in fake.requests if r[0] == "PUT") == 1
    assert len(fake.instances) == 1  # it did rent


def test_offer_gone_is_rejected(fake, client):
    offer_id = fake.add_offer()
    assert client.create_instance(offer_id, SPEC).outcome is CreateOutcome.RENTED
    again = client.create_instance(offer_id, SPEC)
    assert again.outcome is CreateOutcome.REJECTED and "no longer available" in again.message


def test_destroy_is_idempotent(fake, client):
    iid = fake.add_instance(label="klein")
    assert client.destroy_instance(iid) is True
    assert client.destroy_instance(iid) is False
    assert fake.instances == {}


# -- the reconciler: applying decisions ---------------------------------------------------------------

POLICY = PolicyConfig(image=IMAGE, max_instances=4, max_hourly_usd=2.0, target_wait_s=120)


def _decide(fake: FakeVast, client: VastClient, *, visible: int, now: float, pending=()):
    obs = Observation(
        now=now,
        samples=[QueueSample(at=now, visible=visible, in_flight=0)],
        instances=client.list_instances(label="klein"),
        offers=client.search_offers(OfferRequirements().to_query()),
        pending=pending,
    )
    return decide(obs, config=POLICY, requirements=OfferRequirements(), throughput=ThroughputModel())


def test_timed_out_rent_is_found_by_listing_not_rented_again(fake, client):
    offer_id = fake.add_offer(dph_total=0.3)
    fake.add_offer(dph_total=0.5)
    fake.slow_create(offer_id, 1.0)
    decision = _decide(fake, client, visible=50, now=fake.clock())
    assert [r.offer.id for r in decision.rents] == [offer_id]
    report = Reconciler(client=client, launch=SPEC, max_hourly_usd=2.0).apply(decision, dry_run=False)
    assert "found by listing" in report.actions[0].outcome
    assert sum(1 for r in fake.requests if r[0] == "PUT") == 1 and len(fake.instances) == 1
    assert report.pending == []


def test_unclear_rent_not_listed_yet_stays_pending_and_counts(fake, client):
    offer_id = fake.add_offer(dph_total=0.3)
    fake.add_offer(dph_total=0.5)
    fake.slow_create(offer_id, 1.0, listed_late=True)
    now = fake.clock()
    decision = _decide(fake, client, visible=50, now=now)
    report = Reconciler(client=client, launch=SPEC, max_hourly_usd=2.0).apply(decision, dry_run=False)
    assert report.actions[0].outcome.startswith("unknown")
    assert [p.offer_id for p in report.pending] == [offer_id]
    # Not listed yet: the pending rent is the capacity, and nothing is rented again for the same backlog.
    again = _decide(fake, client, visible=50, now=now + 1, pending=report.pending)
    assert again.capacity == 1 and again.rents == () and again.hourly_now == pytest.approx(0.3)
    deadline = time.monotonic() + 5
    while not fake.instances and time.monotonic() < deadline:
        time.sleep(0.05)
    # Listed now: the instance replaces the pending entry.
    later = _decide(fake, client, visible=50, now=fake.clock(), pending=report.pending)
    assert later.capacity == 1 and later.pending == () and later.rents == ()
    assert sum(1 for r in fake.requests if r[0] == "PUT") == 1


def test_offer_sold_meanwhile_falls_back_to_the_next_best(fake, client):
    first = fake.add_offer(dph_total=0.30)
    second = fake.add_offer(dph_total=0.35)
    decision = _decide(fake, client, visible=50, now=fake.clock())
    assert [r.offer.id for r in decision.rents] == [first]
    client.create_instance(first, LaunchSpec(image="someone/else", label="theirs", env={}))  # sold to another
    report = Reconciler(client=client, launch=SPEC, max_hourly_usd=2.0).apply(decision, dry_run=False)
    assert [a.outcome.split(":")[0] for a in report.actions] == ["rejected", "rented"]
    assert f"offer {second} " in report.actions[1].target
    assert [i.label for i in client.list_instances(label="klein")] == ["klein"]


def test_offer_sold_twice_never_boots_and_is_replaced_on_another_machine(fake, client):
    oversold = fake.add_offer(dph_total=0.30)
    fake.oversell(oversold)
    other = fake.add_offer(dph_total=0.40)
    client.create_instance(oversold, LaunchSpec(image="someone/else", label="theirs", env={}))
    start = fake.clock()
    reconciler = Reconciler(client=client, launch=SPEC, max_hourly_usd=2.0)
    reconciler.apply(_decide(fake, client, visible=50, now=start), dry_run=False)
    ours = client.list_instances(label="klein")
    assert len(ours) == 1 and "already in use" in ours[0].status_msg
    fake.boot_all()  # everything else boots; ours stays loading
    later = start + POLICY.boot_deadline_s + 1
    decision = _decide(fake, client, visible=50, now=later)
    assert [(d.instance.id, d.reason) for d in decision.destroys] == [(ours[0].id, "stuck")]
    assert ours[0].machine_id in decision.avoid
    assert [r.offer.id for r in decision.rents] == [other]
    reconciler.apply(decision, dry_run=False)
    assert [i.machine_id for i in client.list_instances(label="klein")] != [ours[0].machine_id]


def test_outbid_instance_is_destroyed_and_replaced(fake, client):
    fake.add_offer(dph_total=0.3)
    iid = fake.add_instance(label="klein", image_uuid=IMAGE, actual_status="running", start_date=fake.clock())
    fake.outbid(iid)
    decision = _decide(fake, client, visible=10, now=fake.clock())
    assert [(d.instance.id, d.reason) for d in decision.destroys] == [(iid, "outbid")]
    report = Reconciler(client=client, launch=SPEC, max_hourly_usd=2.0).apply(decision, dry_run=False)
    assert [a.outcome.split(":")[0] for a in report.actions] == ["destroyed", "rented"]
    assert iid not in fake.instances


def test_reconciler_rechecks_the_cap(fake, client):
    fake.add_offer(dph_total=0.3)
    decision = _decide(fake, client, visible=50, now=fake.clock())
    report = Reconciler(client=client, launch=SPEC, max_hourly_usd=0.1).apply(decision, dry_run=False)
    assert report.actions[0].outcome.startswith("skipped") and fake.mutations() == []


def test_dry_run_changes_nothing(fake, client):
    fake.add_offer()
    fake.add_instance(label="klein", image_uuid=IMAGE, actual_status="exited")
    decision = _decide(fake, client, visible=50, now=fake.clock())
    report = Reconciler(client=client, launch=SPEC, max_hourly_usd=2.0).apply(decision, dry_run=True)
    assert {a.kind for a in report.actions} == {"rent", "destroy"}
    assert all(a.outcome == "dry run" for a in report.actions)
    assert fake.mutations() == []


def test_pending_rent_model_roundtrip():
    p = PendingRent(
        offer_id=1, machine_id=2, dph_total=0.3, num_gpus=1, gpu_name="x", requested_at=1, expires_at=2
    )
    assert p.expires_at > p.requested_at
