"""Worker overhead per job (``scripts/bench_overhead.py``): the real runner on the tiny model against the
local stack (moto SQS + S3 on loopback), and image encode times.

Overhead = (receive returned -> delete returned) - engine time. The engine and the queue are wrapped
(composition, not mocks) only to take timestamps: the wrapped queue goes in through
``build_runner(source=...)``.
"""

from __future__ import annotations

import io
import os
import statistics
import time

import numpy as np
from PIL import Image

from handlers.imaging import encode_image
from klein_facts.jobs import OutputFormat
from measurement.workload import queue_generate_job
from worker.app import build_runner, job_source
from worker.boot import build_engines
from worker.config import Settings
from worker.local import start_local_stack
from worker.variant import Variant


class TimedSource:
    def __init__(self, inner):
        self.inner, self.received, self.deleted = inner, {}, {}

    def receive(self, **kw):
        messages = self.inner.receive(**kw)
        for m in messages:
            self.received[m.message_id] = time.perf_counter()
        return messages

    def extend(self, message, seconds):
        self.inner.extend(message, seconds)

    def release(self, message, delay_seconds=0):
        self.inner.release(message, delay_seconds)

    def delete(self, message):
        self.inner.delete(message)
        self.deleted[message.message_id] = time.perf_counter()


class TimedEngine:
    def __init__(self, inner):
        self.inner, self.spent = inner, []
        self.name = inner.name

    def generate(self, **kw):
        t0 = time.perf_counter()
        try:
            return self.inner.generate(**kw)
        finally:
            self.spent.append(time.perf_counter() - t0)

    def free_memory(self):
        self.inner.free_memory()


def percentile(values, q):
    return float(np.percentile(np.array(values), q))


def bench_overhead(n_jobs: int, size: int, concurrency: int = 1) -> dict:
    stack = start_local_stack(bucket="bench")
    os.environ.update(stack.env())  # the runner's boto3 client takes credentials from the environment
    try:
        settings = Settings(
            model="tiny",
            device="cpu",
            preload_models=True,
            queue_url=stack.queue_url,
            result_queue_url=stack.result_queue_url,
            aws_endpoint_url=stack.endpoint,
            allow_private_urls=True,
            wait_time_seconds=0,
            # The runner reads its concurrency from here only: without it both rows of the
            # table ran with the default (2).
            job_concurrency=concurrency,
        )
        engines = build_engines(settings, Variant("tiny", "none", "cpu", "bench"))
        timed = TimedEngine(engines.klein)
        engines.klein = timed  # type: ignore[assignment]  # the engine's generate, timed
        for i in range(n_jobs):
            queue_generate_job(stack, f"bench-{i}", size=size, seed=i)
        source = TimedSource(job_source(settings))
        runner = build_runner(settings, engines=engines, source=source)
        wall = time.perf_counter()
        runner.run(burst=True)
        wall = time.perf_counter() - wall
    finally:
        stack.stop()
    ids = sorted(source.deleted, key=source.deleted.get)
    totals = [source.deleted[i] - source.received[i] for i in ids]
    overhead = [(t - e) * 1000 for t, e in zip(totals, timed.spent, strict=True)]
    report = {
        "jobs": len(ids),
        "concurrency": runner.concurrency,  # what the runner really used, not what was asked
        "jobs_per_s": round(len(ids) / wall, 2),
        "image": f"{size}x{size} png",
        "overhead_ms_median": round(statistics.median(overhead), 1),
        "overhead_ms_p95": round(percentile(overhead, 95), 1),
        "engine_ms_median": round(statistics.median(timed.spent) * 1000, 1),
    }
    if concurrency > 1:
        # With two jobs in hand, receive->delete also holds time spent waiting for the other
        # job's inference: only the throughput figure is meaningful then.
        for key in ("overhead_ms_median", "overhead_ms_p95"):
            report.pop(key)
    return report


def bench_encode(runs: int = 5) -> dict:
    rng = np.random.default_rng(0)
    # A smooth image with noise: closer to a generated photo than pure noise or a flat fill.
    y, x = np.mgrid[0:1024, 0:1024]
    base = np.stack([(x / 4) % 256, (y / 4) % 256, ((x + y) / 8) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    out: dict[str, dict[str, float]] = {}
    formats: tuple[tuple[OutputFormat, int | None], ...] = (("png", None), ("webp", 90), ("jpeg", 90))
    for fmt, quality in formats:
        times, size = [], 0
        for _ in range(runs):
            t0 = time.perf_counter()
            data, _ = encode_image(image, fmt, quality)
            times.append((time.perf_counter() - t0) * 1000)
            size = len(data)
        out[fmt] = {"ms_median": round(statistics.median(times), 1), "bytes": size}
    # Pillow's defaults (PNG level 6, WebP method 4) for comparison with the chosen settings.
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        times.append((time.perf_counter() - t0) * 1000)
    out["png_pillow_default"] = {
        "ms_median": round(statistics.median(times), 1),
        "bytes": len(buf.getvalue()),
    }
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        buf = io.BytesIO()
        image.save(buf, format="WEBP", quality=90)
        times.append((time.perf_counter() - t0) * 1000)
    out["webp_pillow_default"] = {
        "ms_median": round(statistics.median(times), 1),
        "bytes": len(buf.getvalue()),
    }
    return out
