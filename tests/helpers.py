"""Helpers the tests import (fixtures stay in conftest.py): run the worker on a moto stack,
in-process or as a real process, send jobs, read results, queue depths and uploaded images."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image

from worker.local import LocalStack


def worker_settings(stack: LocalStack, **overrides: Any) -> Any:
    from worker.config import Settings

    values: dict[str, Any] = {
        "queue_url": stack.queue_url,
        "result_queue_url": stack.result_queue_url,
        "aws_endpoint_url": stack.endpoint,
        "allow_private_urls": True,
        "model": "tiny",
        "device": "cpu",
        "wait_time_seconds": 0,
        "retry_backoff_seconds": 0,
        "worker_id": "test-worker",
    }
    values.update(overrides)
    return Settings(**values)


def run_worker(stack: LocalStack, engines: Any, **overrides: Any) -> int:
    """Run the real worker in burst mode until the queue is empty; returns jobs finished."""
    from worker.app import build_runner

    runner = build_runner(worker_settings(stack, **overrides), engines=engines)
    return runner.run(burst=True)


ROOT = Path(__file__).resolve().parent.parent


def spawn_worker(stack: LocalStack, **env: Any) -> subprocess.Popen[str]:
    """`python -m worker` as a real process on the tiny model, pointed at ``stack``; ``env`` overrides."""
    full = {
        **os.environ,
        **stack.env(),
        "MODEL": "tiny",
        "DEVICE": "cpu",
        "WAIT_TIME_SECONDS": "1",
        "LOG_FORMAT": "json",
        "WORKER_ID": "proc-worker",
        "PYTHONUNBUFFERED": "1",
        **{k: str(v) for k, v in env.items()},
    }
    return subprocess.Popen(
        [sys.executable, "-m", "worker"],
        cwd=ROOT,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def serve_jobs(
    stack: LocalStack, jobs: list[dict[str, Any]], **env: Any
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Queue ``jobs``, run one worker process (``spawn_worker`` with ``env``) until all their results
    are on the result queue, stop it; return its ``ready`` line's boot phases and the results by id."""
    for job in jobs:
        send(stack, job)
    proc = spawn_worker(stack, **env)
    try:
        found = results(stack, expected=len(jobs), wait=20)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=120)
    ready = [json.loads(line) for line in stderr.splitlines() if '"event": "ready"' in line]
    assert ready and len(found) == len(jobs), stderr[-4000:]
    return ready[0]["boot"], {result["id"]: result for result in found}


def send(stack: LocalStack, job: dict[str, Any] | str) -> str:
    body = job if isinstance(job, str) else json.dumps(job)
    return stack.client("sqs").send_message(QueueUrl=stack.queue_url, MessageBody=body)["MessageId"]


def results(
    stack: LocalStack, expected: int | None = None, wait: int = 1, timeout_s: float | None = None
) -> list[dict[str, Any]]:
    """Results from the result queue: ``expected`` of them, or (None) all until a poll comes back
    empty. ``timeout_s`` bounds the whole wait (default 20 polls of ``wait`` seconds): a worker
    that boots slowly on a loaded machine gets that long, not a number of empty polls."""
    sqs = stack.client("sqs")
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + (20 * wait if timeout_s is None else timeout_s)
    while True:
        reply = sqs.receive_message(
            QueueUrl=stack.result_queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait
        )
        messages = reply.get("Messages", [])
        for message in messages:
            found.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=stack.result_queue_url, ReceiptHandle=message["ReceiptHandle"])
        if (expected is not None and len(found) >= expected) or (expected is None and not messages):
            return found
        if time.monotonic() >= deadline:
            return found


def queue_counts(stack: LocalStack, queue_url: str | None = None) -> tuple[int, int]:
    attrs = stack.client("sqs").get_queue_attributes(
        QueueUrl=queue_url or stack.queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def s3_image(stack: LocalStack, key: str) -> tuple[Image.Image, str, bytes]:
    obj = stack.client("s3").get_object(Bucket=stack.bucket, Key=key)
    data = obj["Body"].read()
    return Image.open(io.BytesIO(data)), obj["ContentType"], data


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module, to call its ``main`` in-process (no second torch import)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module
