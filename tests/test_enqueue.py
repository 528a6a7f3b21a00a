"""`python -m worker enqueue FILE --presign`: s3:// destinations become presigned URLs the worker can use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import results, run_worker, s3_image
from tests.scripted_http import png_bytes

ROOT = Path(__file__).resolve().parent.parent


def test_enqueue_presigns_s3_urls_and_the_job_runs(stack, engines, tmp_path):
    stack.client("s3").put_object(Bucket=stack.bucket, Key="enq/in.png", Body=png_bytes(40, 30))
    jobs = [
        {
            "id": "enq-up",
            "type": "upscale",
            "input": {
                "image_url": f"s3://{stack.bucket}/enq/in.png",
                "upload_url": f"s3://{stack.bucket}/enq/out.png",
                "scale": 2,
            },
        },
        {
            "id": "enq-gen",
            "type": "generate",
            "input": {
                "prompts": ["a"],
                "upload_urls": [f"s3://{stack.bucket}/enq/gen.png"],
                "width": 256,
                "height": 256,
            },
        },
    ]
    job_file = tmp_path / "jobs.json"
    job_file.write_text(json.dumps(jobs))

    proc = subprocess.run(
        [sys.executable, "-m", "worker", "enqueue", str(job_file), "--presign"],
        cwd=ROOT,
        env={**os.environ, **stack.env()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "enqueued enq-up" in proc.stdout and "enqueued enq-gen" in proc.stdout

    body = json.loads(
        stack.client("sqs").receive_message(QueueUrl=stack.queue_url, VisibilityTimeout=0)["Messages"][0][
            "Body"
        ]
    )
    assert body["input"].get("image_url", body["input"].get("upload_urls", [""])[0]).startswith("http")

    assert run_worker(stack, engines) == 2
    by_id = {r["id"]: r for r in results(stack, expected=2)}
    assert by_id["enq-up"]["status"] == "succeeded" and by_id["enq-gen"]["status"] == "succeeded"
    assert s3_image(stack, "enq/out.png")[0].size == (80, 60)
    assert s3_image(stack, "enq/gen.png")[0].size == (256, 256)


def test_a_missing_or_broken_job_file_is_one_clear_error(stack, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for path, expected in ((tmp_path / "missing.json", "does not exist"), (broken, "not a readable JSON")):
        proc = subprocess.run(
            [sys.executable, "-m", "worker", "enqueue", str(path)],
            cwd=ROOT,
            env={**os.environ, **stack.env(), "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
