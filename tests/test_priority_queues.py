"""QUEUE_URLS: several job queues, highest first, through the real worker against moto."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime

import pytest

from tests.helpers import queue_counts, results, worker_settings
from tests.scripted_http import png_bytes
from worker.app import build_runner
from worker.local import create_queues
from worker.priority import TOP_POLL_CAP_SECONDS

# The stated bound (README, worker/priority.py) is a few loopback round trips; generous for a
# loaded CI machine, and still far below the long poll a low queue would otherwise impose.
HIGH_LATENCY_BOUND_S = 2.0


def _low_queue(stack) -> str:
    name = stack.queue_url.rsplit("/", 1)[-1]
    return create_queues(stack.client("sqs"), f"{name}-low")[0]


def _source(stack) -> str:
    key = f"prio/in-{time.monotonic_ns()}.png"
    stack.client("s3").put_object(Bucket=stack.bucket, Key=key, Body=png_bytes(32, 24, color=(200, 30, 30)))
    return stack.presign_get(key)


def _job(stack, job_id: str, source: str) -> dict:
    return {
        "id": job_id,
        "type": "upscale",
        "input": {
            "image_url": source,
            "upload_url": stack.presign_put(f"prio/{job_id}.png", "image/png"),
            "scale": 2,
        },
    }


def _send(stack, queue_url: str, job: dict) -> None:
    stack.client("sqs").send_message(QueueUrl=queue_url, MessageBody=json.dumps(job))


def _taken_order(found: list[dict]) -> list[str]:
    """Job ids in the order the worker took them (received_at), not the order results arrived."""
    return [r["id"] for r in sorted(found, key=lambda r: datetime.fromisoformat(r["received_at"]))]


def test_with_both_queues_full_the_high_queue_drains_first(stack, engines):
    low = _low_queue(stack)
    source = _source(stack)
    for i in range(3):  # the low queue fills first: arrival order must not matter
        _send(stack, low, _job(stack, f"low-{i}", source))
    for i in range(3):
        _send(stack, stack.queue_url, _job(stack, f"high-{i}", source))
    settings = worker_settings(
        stack, queue_url=None, queue_urls=f"{stack.queue_url},{low}", job_concurrency=1
    )

    assert build_runner(settings, engines=engines).run(burst=True) == 6

    found = results(stack, expected=6)
    order = _taken_order(found)
    assert [i.split("-")[0] for i in order] == ["high"] * 3 + ["low"] * 3
    assert all(r["status"] == "succeeded" for r in found)
    by_id = {r["id"]: r for r in found}
    assert {by_id[f"high-{i}"]["queue"] for i in range(3)} == {stack.queue_url}
    assert {by_id[f"low-{i}"]["queue"] for i in range(3)} == {low}
    assert queue_counts(stack) == (0, 0) and queue_counts(stack, low) == (0, 0)  # each deleted where it was


def test_lower_queue_share_lets_low_jobs_through(stack, engines):
    low = _low_queue(stack)
    source = _source(stack)
    for i in range(4):
        _send(stack, stack.queue_url, _job(stack, f"high-{i}", source))
    for i in range(2):
        _send(stack, low, _job(stack, f"low-{i}", source))
    settings = worker_settings(
        stack, queue_url=None, queue_urls=f"{stack.queue_url},{low}", job_concurrency=1, lower_queue_share=0.5
    )

    assert build_runner(settings, engines=engines).run(burst=True) == 6

    order = _taken_order(results(stack, expected=6))
    # Half a turn per job taken: a low job every second job while both have work.
    assert [i.split("-")[0] for i in order] == ["high", "high", "low", "high", "low", "high"]


def test_a_high_job_arriving_during_the_long_poll_is_taken_within_the_bound(stack, engines):
    low = _low_queue(stack)
    settings = worker_settings(
        stack, queue_url=None, queue_urls=f"{stack.queue_url},{low}", wait_time_seconds=20, job_concurrency=1
    )
    settled: dict[str, threading.Event] = {"high": threading.Event(), "low": threading.Event()}

    def on_event(status: str, fields: dict) -> None:
        settled[fields["id"].split("-")[0]].set()

    runner = build_runner(settings, engines=engines, on_event=on_event, on_abandon=lambda: None)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    source = _source(stack)

    def latency(queue: str, job_id: str) -> tuple[float, dict]:
        sent = time.time()
        _send(stack, queue, _job(stack, job_id, source))
        assert settled[job_id.split("-")[0]].wait(60), f"{job_id} was never taken"
        settled[job_id.split("-")[0]].clear()
        (result,) = results(stack, expected=1)
        return datetime.fromisoformat(result["received_at"]).timestamp() - sent, result

    try:
        time.sleep(1.5)  # the worker is now idle, inside a sweep's long poll of the high queue
        taken_after, high = latency(stack.queue_url, "high-1")
        assert taken_after < HIGH_LATENCY_BOUND_S and high["queue"] == stack.queue_url
        # Past the top poll's cap the sweep has looked at the low queue: had it long-polled there,
        # this job would wait for that poll to end.
        time.sleep(TOP_POLL_CAP_SECONDS + 1.5)
        taken_after, high = latency(stack.queue_url, "high-2")
        assert taken_after < HIGH_LATENCY_BOUND_S

        # A low job on an idle worker waits at most the capped long poll of the top queue.
        taken_after, low_result = latency(low, "low-1")
        assert taken_after < TOP_POLL_CAP_SECONDS + HIGH_LATENCY_BOUND_S
        assert low_result["queue"] == low
    finally:
        runner.request_stop()
        thread.join(timeout=TOP_POLL_CAP_SECONDS + 30)
    assert not thread.is_alive()


@pytest.mark.parametrize(
    ("queue_url", "queue_urls", "message"),
    [
        ("https://q/a", "https://q/b", "not both"),
        (None, None, "QUEUE_URL or QUEUE_URLS is required"),
        (None, "https://q/a, https://q/a", "same queue twice"),
    ],
)
def test_queue_configuration_errors_are_clear(stack, queue_url, queue_urls, message):
    settings = worker_settings(stack, queue_url=queue_url, queue_urls=queue_urls)
    with pytest.raises(SystemExit, match=message):
        settings.require_queues()


def test_queue_urls_alone_reads_highest_first(stack):
    settings = worker_settings(stack, queue_url=None, queue_urls=" https://q/high ,https://q/low,")
    assert settings.require_queues() == ["https://q/high", "https://q/low"]


def test_a_retry_goes_back_to_the_queue_the_job_came_from(stack, engines, scripted):
    low = _low_queue(stack)
    job = {
        "id": "low-retry",
        "type": "upscale",
        "input": {
            "image_url": f"{scripted.url}/img/in.png",
            "upload_url": f"{scripted.url}/status/503/o.png",
            "scale": 2,
        },
    }
    _send(stack, low, job)
    settings = worker_settings(stack, queue_url=None, queue_urls=f"{stack.queue_url},{low}", max_attempts=2)

    # The first attempt releases the message (backoff 0 in tests) back to the low queue; the second
    # finds it there, publishes the failure and deletes it.
    assert build_runner(settings, engines=engines).run(burst=True) == 1

    (result,) = results(stack, expected=1)
    assert result["attempt"] == 2 and result["error"]["code"] == "upload_failed"
    assert result["queue"] == low
    assert queue_counts(stack) == (0, 0) and queue_counts(stack, low) == (0, 0)
