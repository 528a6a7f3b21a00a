"""gpu_seconds and cost_usd in results, logs and metrics, through the real worker against moto."""

from __future__ import annotations

import logging
import re
import urllib.request
from datetime import datetime

from tests.helpers import results, send, worker_settings
from worker.app import build_runner
from worker.telemetry import Telemetry

PRICE = 3.6  # $/h: one tenth of a cent per second, easy to check by hand
SLACK_S = 0.1  # timestamps vs the share clock: a few calls apart
HOLD_S = 3 * SLACK_S  # how long two concurrent jobs are certainly both in hand (well above SLACK_S)


def _generate(stack, job_id: str, *, size: int = 256, prompts: int = 1, reference: str = "") -> dict:
    return {
        "id": job_id,
        "type": "generate",
        "input": {
            "prompts": [f"a lighthouse {i}" for i in range(prompts)],
            "upload_urls": [stack.presign_put(f"cost/{job_id}-{i}.png", "image/png") for i in range(prompts)],
            "width": size,
            "height": size,
            "seed": 1,
            **({"images": [{"url": reference}]} if reference else {}),
        },
    }


def _wall(result: dict) -> tuple[float, float]:
    return (
        datetime.fromisoformat(result["received_at"]).timestamp(),
        datetime.fromisoformat(result["finished_at"]).timestamp(),
    )


def test_generate_result_carries_gpu_seconds_and_cost_from_price(stack, engines, caplog):
    caplog.set_level(logging.INFO, logger="worker.runner")
    send(stack, _generate(stack, "priced"))
    send(stack, {"id": "bad-size", "type": "generate", "input": {"prompts": ["x"], "upload_urls": []}})
    runner = build_runner(worker_settings(stack, price_per_hour=PRICE, job_concurrency=2), engines=engines)
    assert runner.run(burst=True) == 2

    by_id = {r["id"]: r for r in results(stack, expected=2)}
    job = by_id["priced"]
    assert job["status"] == "succeeded" and job["queue"] == stack.queue_url
    start, end = _wall(job)
    assert 0 < job["gpu_seconds"] <= end - start + SLACK_S
    # Alone on the worker, the job is charged its whole wall time, of which the GPU time is a part.
    assert PRICE * job["gpu_seconds"] / 3600 <= job["cost_usd"] <= PRICE * (end - start + SLACK_S) / 3600
    # An invalid job never touched the model; it still cost its (short) moment of the worker.
    bad = by_id["bad-size"]
    assert bad["status"] == "failed" and bad["gpu_seconds"] == 0.0
    assert 0 <= bad["cost_usd"] < job["cost_usd"]
    # The job's log line carries the same figures.
    logged = {
        r.job["id"]: r.job for r in caplog.records if hasattr(r, "job") and r.job.get("status") != "started"
    }
    assert logged["priced"]["gpu_seconds"] == job["gpu_seconds"]
    assert logged["priced"]["cost_usd"] == job["cost_usd"]
    assert logged["priced"]["queue"] == stack.queue_url


def test_without_a_price_cost_is_null_and_gpu_seconds_stay(stack, engines):
    send(stack, _generate(stack, "unpriced"))
    assert build_runner(worker_settings(stack), engines=engines).run(burst=True) == 1
    (result,) = results(stack, expected=1)
    assert result["status"] == "succeeded"
    assert "cost_usd" in result and result["cost_usd"] is None
    assert result["gpu_seconds"] > 0


def test_concurrent_jobs_split_the_price_of_the_time_they_shared(stack, engines, scripted):
    # Overlap by construction, not by timing: each job's reference image is held by the server until
    # both jobs have asked for theirs, then HOLD_S longer, so both are in hand for at least HOLD_S
    # however loaded the machine is (a lone request gets a 409 after a timeout, never a hang).
    scripted.together_hold = HOLD_S
    for job_id in ("first", "second"):
        send(stack, _generate(stack, job_id, prompts=2, reference=f"{scripted.url}/together/2/{job_id}.png"))
    settings = worker_settings(stack, price_per_hour=PRICE, job_concurrency=2)
    assert build_runner(settings, engines=engines).run(burst=True) == 2

    found = results(stack, expected=2)
    assert [r["status"] for r in found] == ["succeeded", "succeeded"], found
    walls = sorted(_wall(r) for r in found)
    assert walls[0][1] - walls[1][0] >= HOLD_S, "the two jobs did not overlap; the test proves nothing"
    busy = max(end for _, end in walls) - walls[0][0]  # one interval: they overlap
    charged_s = sum(r["cost_usd"] for r in found) * 3600 / PRICE
    # Together they are charged the worker's busy time once, not each its own wall time.
    assert abs(charged_s - busy) < SLACK_S
    assert charged_s < sum(end - start for start, end in walls) - SLACK_S
    # The model is held by one job at a time: the GPU seconds fit in the busy time.
    assert sum(r["gpu_seconds"] for r in found) <= busy + SLACK_S


def _metric(body: str, name: str, job_type: str) -> float:
    match = re.search(rf'^{name}\{{type="{job_type}"\}} (\S+)$', body, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_gpu_seconds_and_cost_per_job_type(stack, engines):
    telemetry = Telemetry(gpu_memory=list)
    port = telemetry.serve(0, host="127.0.0.1")
    try:
        settings = worker_settings(stack, price_per_hour=PRICE, job_concurrency=2)
        totals = []
        for job_id in ("m1", "m2"):
            send(stack, _generate(stack, job_id))
            build_runner(settings, engines=engines, on_event=telemetry.observe).run(burst=True)
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            totals.append(
                (
                    _metric(body, "klein_gpu_seconds_total", "generate"),
                    _metric(body, "klein_job_cost_usd_total", "generate"),
                )
            )
        found = {r["id"]: r for r in results(stack, expected=2)}
    finally:
        telemetry.close()
    assert 0 < totals[0][0] < totals[1][0] and 0 < totals[0][1] < totals[1][1]
    assert abs(totals[1][0] - (found["m1"]["gpu_seconds"] + found["m2"]["gpu_seconds"])) < 1e-3
    assert abs(totals[1][1] - (found["m1"]["cost_usd"] + found["m2"]["cost_usd"])) < 1e-7
