"""A GPU out-of-memory fails only the job that caused it, names what was asked, and the next job runs."""

from __future__ import annotations

from handlers.engine_set import Engines
from tests.helpers import queue_counts, results, run_worker, s3_image, send
from tests.oom_engine import OomAboveEngine


def test_oom_fails_the_job_with_out_of_memory_and_the_worker_goes_on(stack, engines):
    oom_engine = OomAboveEngine(engines.klein, max_pixels=256 * 256)
    oom_engines = Engines(klein=oom_engine, upscaler=engines.upscaler)
    send(
        stack,
        {
            "id": "too-big",
            "type": "generate",
            "input": {
                "prompts": ["huge"],
                "upload_urls": [stack.presign_put("big.png")],
                "width": 2048,
                "height": 1536,
            },
        },
    )
    send(
        stack,
        {
            "id": "fits",
            "type": "generate",
            "input": {
                "prompts": ["small"],
                "upload_urls": [stack.presign_put("small.png")],
                "width": 256,
                "height": 256,
            },
        },
    )

    assert run_worker(stack, oom_engines) == 2

    by_id = {r["id"]: r for r in results(stack, expected=2)}
    failed = by_id["too-big"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "out_of_memory"
    assert "2048x1536" in failed["error"]["message"] and "0 reference" in failed["error"]["message"]
    assert failed["attempt"] == 1  # permanent for this size: not retried
    assert oom_engine.frees >= 1  # caches were freed
    assert by_id["fits"]["status"] == "succeeded"
    assert s3_image(stack, "small.png")[0].size == (256, 256)
    assert queue_counts(stack) == (0, 0)
