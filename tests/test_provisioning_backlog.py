"""The backlog reader against a real (moto) SQS server, and one autoscale tick from queue to rents."""

from __future__ import annotations

import threading

import boto3
import pytest
from moto.server import ThreadedMotoServer

from provisioning.autoscale import Autoscaler
from provisioning.backlog import SqsBacklog, _region_from_url
from provisioning.offers import OfferRequirements
from provisioning.policy import PolicyConfig
from provisioning.reconcile import Reconciler
from provisioning.state import FleetMemory, StateFile
from provisioning.throughput import ThroughputModel
from provisioning.vast import LaunchSpec, VastClient
from tests.fake_vast import IMAGE, FakeVast


@pytest.fixture(scope="module")
def sqs():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client(
        "sqs",
        endpoint_url=f"http://{host}:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    yield client
    server.stop()


def test_sample_reads_visible_in_flight_and_delayed(sqs):
    url = sqs.create_queue(QueueName="backlog-counts")["QueueUrl"]
    for k in range(4):
        sqs.send_message(QueueUrl=url, MessageBody=f"job {k}")
    sqs.send_message(QueueUrl=url, MessageBody="retry", DelaySeconds=60)
    sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=60)
    sample = SqsBacklog(client=sqs, queue_url=url).sample(now=123.0)
    assert (sample.at, sample.visible, sample.in_flight, sample.delayed) == (123.0, 3, 1, 1)
    assert sample.backlog == 4


def test_region_comes_from_an_aws_queue_url():
    assert _region_from_url("https://sqs.eu-west-1.amazonaws.com/123/jobs") == "eu-west-1"
    assert _region_from_url("http://127.0.0.1:4566/000000000000/jobs") is None


def test_autoscale_tick_rents_for_the_backlog_and_remembers(sqs, tmp_path):
    url = sqs.create_queue(QueueName="backlog-autoscale")["QueueUrl"]
    for batch in range(20):
        entries = [{"Id": str(k), "MessageBody": f"job {batch}-{k}"} for k in range(10)]
        sqs.send_message_batch(QueueUrl=url, Entries=entries)
    with FakeVast() as fake:
        for price in (0.30, 0.32, 0.35, 0.40):
            fake.add_offer(dph_total=price)
        vast = VastClient(api_key=fake.api_key, api_url=fake.url, backoff_s=0.0)
        launch = LaunchSpec(image=IMAGE, label="klein", env={"QUEUE_URL": url})
        policy = PolicyConfig(image=IMAGE, max_instances=3, max_hourly_usd=5.0, target_wait_s=120)
        state = StateFile(path=tmp_path / "state.json")
        scaler = Autoscaler(
            vast=vast,
            backlog=SqsBacklog(client=sqs, queue_url=url),
            label="klein",
            policy=policy,
            requirements=OfferRequirements(),
            throughput=ThroughputModel(),
            reconciler=Reconciler(client=vast, launch=launch, max_hourly_usd=5.0),
            state=state,
        )
        tick = scaler.tick(dry_run=False)
        # 200 / (80 DLPerf x 0.01 = 0.8 jobs/s x 120 s) = 2.08 -> 3, the max
        assert tick.decision.desired == 3
        assert [a.outcome.split(":")[0] for a in tick.report.actions] == ["rented"] * 3
        assert len(vast.list_instances(label="klein")) == 3
        assert [s.visible for s in state.load().samples] == [200]
        second = scaler.tick(dry_run=False)
        assert second.report.actions == [] and second.decision.capacity == 3
        assert len(state.load().samples) == 2


def test_state_file_survives_damage(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("{not json")
    assert StateFile(path=path).load() == FleetMemory()


def test_autoscale_loop_ticks_until_stopped_and_survives_a_failing_tick(sqs, caplog):
    url = sqs.create_queue(QueueName="backlog-loop")["QueueUrl"]
    with FakeVast() as fake:
        fake.add_offer()
        vast = VastClient(api_key=fake.api_key, api_url=fake.url, backoff_s=0.0, max_attempts=1)
        scaler = Autoscaler(
            vast=vast,
            backlog=SqsBacklog(client=sqs, queue_url=url),
            label="klein",
            policy=PolicyConfig(image=IMAGE, max_instances=2),
            requirements=OfferRequirements(),
            throughput=ThroughputModel(),
            reconciler=Reconciler(
                client=vast, launch=LaunchSpec(image=IMAGE, label="klein", env={}), max_hourly_usd=1
            ),
        )
        stop = threading.Event()
        ticks = []

        def on_tick(tick):
            ticks.append(tick)
            if len(ticks) == 1:
                fake.rate_limit(1)  # the next tick fails (one attempt only) and is retried a tick later
            if len(ticks) == 2:
                stop.set()

        scaler.run(interval_s=0.01, dry_run=True, on_tick=on_tick, stop=stop)
    assert len(ticks) == 2 and "autoscale tick failed" in caplog.text
    # Vast is asked before the queue (a refused key ends the run first): the failed tick sampled nothing.
    assert len(scaler.memory.samples) == 2


def _fill(sqs, url: str, count: int) -> None:
    for start in range(0, count, 10):
        entries = [{"Id": str(k), "MessageBody": "job"} for k in range(min(10, count - start))]
        sqs.send_message_batch(QueueUrl=url, Entries=entries)


def test_several_queues_are_sampled_each_and_sized_by_their_own_target_waits(sqs, tmp_path):
    high = sqs.create_queue(QueueName="backlog-high")["QueueUrl"]
    low = sqs.create_queue(QueueName="backlog-low")["QueueUrl"]
    _fill(sqs, high, 30)
    _fill(sqs, low, 60)
    backlog = SqsBacklog(client=sqs, queues=[(high, 30.0), (low, None)])
    sample = backlog.sample(now=5.0)
    assert [(q.name, q.visible, q.target_wait_s) for q in sample.queues] == [
        ("backlog-high", 30, 30.0),
        ("backlog-low", 60, None),
    ]
    assert (sample.visible, sample.backlog) == (90, 90)
    # The high queue must clear 30 jobs in 30 s; the low one waits behind it: 90 jobs in the fleet's 3600 s.
    assert sample.required_rate(3600.0) == pytest.approx(1.0)
    state = StateFile(path=tmp_path / "state.json")
    state.save(FleetMemory(samples=[sample]))
    assert state.load().samples == [sample]

    with FakeVast() as fake:
        for price in (0.30, 0.32, 0.35):
            fake.add_offer(dph_total=price)
        vast = VastClient(api_key=fake.api_key, api_url=fake.url, backoff_s=0.0)
        scaler = Autoscaler(
            vast=vast,
            backlog=backlog,
            label="klein",
            policy=PolicyConfig(image=IMAGE, max_instances=3, max_hourly_usd=5.0, target_wait_s=3600),
            requirements=OfferRequirements(),
            throughput=ThroughputModel(),
            reconciler=None,
            memory=FleetMemory(),
        )
        _, decision = scaler.plan()
    # 1.0 job/s needed / (80 DLPerf x 0.01 = 0.8 jobs/s per instance) -> 2; one queue of 90 jobs at
    # a 3600 s target would have wanted 1.
    assert decision.desired == 2
    assert "each queue's target wait" in decision.reason
