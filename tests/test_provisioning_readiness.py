"""Capacity that serves: the fleet asks each worker's /healthz on its mapped port (fake Vast + a loopback
worker endpoint), and replaces workers that never became ready, stopped being ready, or cannot pull."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from provisioning.autoscale import Autoscaler
from provisioning.models import Phase
from provisioning.offers import OfferRequirements
from provisioning.policy import PolicyConfig
from provisioning.reconcile import Reconciler
from provisioning.throughput import ThroughputModel
from provisioning.vast import LaunchSpec, VastClient
from tests.fake_vast import IMAGE, FakeVast

POLICY = PolicyConfig(image=IMAGE, min_instances=1, max_instances=2, boot_deadline_s=600, unready_after_s=120)
SPEC = LaunchSpec(image=IMAGE, label="klein", env={"QUEUE_URL": "https://sqs.example/q"})


class Health:
    """A worker's /healthz on loopback: answers ``status``."""

    def __init__(self) -> None:
        self.status = 503
        health = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(health.status if self.path == "/healthz" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def health() -> Iterator[Health]:
    h = Health()
    yield h
    h.server.shutdown()
    h.server.server_close()


def scaler(fake: FakeVast, clock: list[float], policy: PolicyConfig = POLICY) -> Autoscaler:
    vast = VastClient(api_key=fake.api_key, api_url=fake.url, backoff_s=0.0, sleep=lambda s: None)
    return Autoscaler(
        vast=vast,
        backlog=None,
        label="klein",
        policy=policy,
        requirements=OfferRequirements(),
        throughput=ThroughputModel(),
        reconciler=Reconciler(client=vast, launch=SPEC, max_hourly_usd=2.0),
        clock=lambda: clock[0],
        health_port=9100,
    )


def worker_row(fake: FakeVast, health: Health, start: float) -> int:
    return fake.add_instance(
        label="klein",
        image_uuid=IMAGE,
        actual_status="running",
        start_date=start,
        public_ipaddr="127.0.0.1",
        ports={"9100/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(health.port)}]},
    )


def test_a_worker_that_never_becomes_ready_is_replaced_after_the_boot_deadline(fake, health):
    offer = fake.add_offer()
    clock = [fake.clock()]
    iid = worker_row(fake, health, clock[0])
    autoscaler = scaler(fake, clock)
    tick = autoscaler.tick(dry_run=False)
    assert tick.decision.phases[iid] is Phase.BOOTING and tick.decision.capacity == 1
    assert fake.rent_bodies == []
    clock[0] += POLICY.boot_deadline_s + 1
    tick = autoscaler.tick(dry_run=False)
    assert [(d.instance.id, d.reason) for d in tick.decision.destroys] == [(iid, "unready")]
    assert [r.offer.id for r in tick.decision.rents] == [offer]
    assert iid not in fake.instances and len(fake.rent_bodies) == 1
    assert fake.offers == {} and autoscaler.memory.avoid  # its machine is avoided


def test_a_worker_that_stops_answering_is_replaced(fake, health):
    fake.add_offer()
    clock = [fake.clock()]
    iid = worker_row(fake, health, clock[0])
    health.status = 200
    autoscaler = scaler(fake, clock)
    assert autoscaler.tick(dry_run=False).decision.phases[iid] is Phase.RUNNING
    health.status = 503
    clock[0] += 60
    assert autoscaler.tick(dry_run=False).decision.phases[iid] is Phase.RUNNING  # a blip is tolerated
    clock[0] += POLICY.unready_after_s
    tick = autoscaler.tick(dry_run=False)
    assert [(d.instance.id, d.reason) for d in tick.decision.destroys] == [(iid, "unready")]
    assert iid not in fake.instances and len(fake.rent_bodies) == 1


def test_with_several_gpus_every_worker_is_asked_and_all_must_answer(fake):
    first, second = Health(), Health()
    try:
        fake.add_offer()
        clock = [fake.clock()]
        iid = fake.add_instance(
            label="klein",
            image_uuid=IMAGE,
            actual_status="running",
            start_date=clock[0],
            num_gpus=2,
            public_ipaddr="127.0.0.1",
            ports={
                "9100/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(first.port)}],
                "9101/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(second.port)}],
            },
        )
        autoscaler = scaler(fake, clock)
        first.status = 200  # GPU 0's worker serves, GPU 1's hangs in its boot
        assert autoscaler.tick(dry_run=False).decision.phases[iid] is Phase.BOOTING
        second.status = 200
        clock[0] += 60
        assert autoscaler.tick(dry_run=False).decision.phases[iid] is Phase.RUNNING
        second.status = 503  # one worker stops answering: the instance is judged by it
        clock[0] += POLICY.unready_after_s + 61
        tick = autoscaler.tick(dry_run=False)
        assert [(d.instance.id, d.reason) for d in tick.decision.destroys] == [(iid, "unready")]
    finally:
        for h in (first, second):
            h.server.shutdown()
            h.server.server_close()


def test_an_unpullable_image_is_recognised_at_once(fake):
    fake.add_offer()
    clock = [fake.clock()]
    iid = fake.add_instance(
        label="klein", image_uuid=IMAGE, actual_status="loading", start_date=clock[0] - 20
    )
    fake.set_status(
        iid,
        "loading",
        "Error response from daemon: pull access denied for ghcr.io/acme/klein-worker, repository does "
        "not exist or may require 'docker login'",
    )
    tick = scaler(fake, clock).tick(dry_run=False)
    assert [(d.instance.id, d.reason) for d in tick.decision.destroys] == [(iid, "unpullable")]
    assert tick.decision.rents == () and any("cannot be pulled" in n for n in tick.decision.notes)
    assert iid not in fake.instances and fake.rent_bodies == [] and tick.decision.avoid == {}


def test_a_resumed_worker_boots_again_and_is_not_judged_by_its_old_readiness(fake, health):
    fake.add_offer()
    clock = [fake.clock()]
    iid = worker_row(fake, health, clock[0] - 3600)
    health.status = 200
    autoscaler = scaler(fake, clock, dataclasses.replace(POLICY, cold_pool=1, fill_cold_pool=False))
    assert autoscaler.tick(dry_run=False).decision.phases[iid] is Phase.RUNNING
    VastClient(api_key=fake.api_key, api_url=fake.url).set_state(iid, "stopped")  # into the pool earlier
    health.status = 503
    clock[0] += 1000
    tick = autoscaler.tick(dry_run=False)
    assert [i.id for i in tick.decision.resumes] == [iid] and tick.decision.rents == ()
    assert autoscaler.memory.resumed == {iid: clock[0]}
    fake.boot_all()
    clock[0] += 60  # running, worker still loading: booting, not "unready" from its old answer
    tick = autoscaler.tick(dry_run=False)
    assert tick.decision.phases[iid] is Phase.BOOTING and tick.decision.destroys == ()
    health.status = 200
    clock[0] += 60
    tick = autoscaler.tick(dry_run=False)
    assert tick.decision.phases[iid] is Phase.RUNNING and autoscaler.memory.resumed == {}
    assert fake.rent_bodies == []
