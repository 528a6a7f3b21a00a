"""One cold start for ``scripts/bench_cold_start.py``: a job queued on the local stack, then a fresh
``python -m worker`` process timed from its spawn to the job's result, its ``ready`` log line
splitting boot from the first job."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from measurement.workload import queue_generate_job
from worker.local import LocalStack


def one_run(
    stack: LocalStack, env: dict[str, str], size: int, index: int, timeout: float, *, cwd: Path
) -> dict[str, Any]:
    """Queue one job, spawn ``python -m worker`` in ``cwd`` and time it to its result; boot phases
    from its ``ready`` log line."""
    queue_generate_job(stack, f"cold-{index}", size=size, seed=index)
    sqs = stack.client("sqs")
    started_wall = time.time()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    result = None
    try:
        while result is None and time.perf_counter() - started < timeout:
            if proc.poll() is not None:
                break
            reply = sqs.receive_message(QueueUrl=stack.result_queue_url, WaitTimeSeconds=1)
            for message in reply.get("Messages", []):
                result = json.loads(message["Body"])
                sqs.delete_message(QueueUrl=stack.result_queue_url, ReceiptHandle=message["ReceiptHandle"])
        first_job_s = time.perf_counter() - started
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=120)
    if result is None or result.get("status") != "succeeded":
        raise SystemExit(f"run {index}: no succeeded result (exit {proc.returncode}):\n{stderr[-3000:]}")
    ready = _ready_entry(stderr)
    ready_s = datetime.fromisoformat(ready["ts"]).timestamp() - started_wall
    return {
        "to_ready_s": round(ready_s, 2),
        "load_s": ready.get("load_s"),  # the worker's own figure: from boot start to ready
        # Its boot phases: imports, weights read, compile-cache load, compile, warm-up, and whether
        # the compile cache hit (graphs_compiled 0: this process compiled nothing).
        "boot": ready.get("boot", {}),
        "to_first_result_s": round(first_job_s, 2),
        "first_job_s": round(first_job_s - ready_s, 2),
        "model": result.get("model"),
    }


def _ready_entry(stderr: str) -> dict[str, Any]:
    for line in stderr.splitlines():
        if '"event": "ready"' in line:
            return json.loads(line)
    raise SystemExit(f"the worker logged no ready event:\n{stderr[-3000:]}")


def keep_only_bundles(compile_cache: str) -> int:
    """Empty COMPILE_CACHE's folders but for their bundles: what a new container holds once it has
    the bundle from S3, without a restarted instance's caches (inductor's builds, dynamo's
    packages, both under ``<folder>/inductor``). S3 entries are left alone. Returns the bundles kept."""
    kept = 0
    for entry in filter(None, (item.strip() for item in compile_cache.split(","))):
        folder = Path(entry)
        if entry.startswith("s3://") or not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.suffix == ".bundle" and path.is_file():
                kept += 1
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    return kept
