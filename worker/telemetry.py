"""Prometheus metrics and /healthz on METRICS_PORT.

Everything hangs off one ``Telemetry`` object created at boot with its own registry (no
import-time globals). The runner reports each settled job through ``observe``; GPU memory is
read from NVML at scrape time, so an idle worker still reports fresh figures.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker.gpu import nvml
from worker.poll_health import PollHealth

log = logging.getLogger(__name__)

# Job durations span 50 ms (tiny upscale) to minutes (a batch of 8 at 2048 with references).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
STAGES = ("download", "load", "inference", "upscale", "upload")
HEALTHY_POLL_AGE = 90.0  # a receive must have succeeded this recently (seconds) to be "ready"


class _GpuMemoryCollector:
    def __init__(self, read: Callable[[], list[tuple[int, int, int]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily("klein_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"])
        total = GaugeMetricFamily("klein_gpu_memory_total_bytes", "GPU memory size (NVML)", labels=["gpu"])
        for index, used_bytes, total_bytes in self._read():
            used.add_metric([str(index)], used_bytes)
            total.add_metric([str(index)], total_bytes)
        yield used
        yield total


def nvml_memory() -> list[tuple[int, int, int]]:
    """(index, used bytes, total bytes) per GPU; [] without a driver (no GPU figures, not an error)."""
    with nvml(missing_level=logging.DEBUG) as pynvml:
        if pynvml is None:
            return []
        rows = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            rows.append((index, int(info.used), int(info.total)))
        return rows


class Telemetry:
    def __init__(
        self,
        *,
        polls: PollHealth | None = None,
        gpu_memory: Callable[[], list[tuple[int, int, int]]] = nvml_memory,
    ) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("klein_jobs_total", "Jobs settled", ["type", "status"], registry=self.registry)
        self.job_seconds = Histogram(
            "klein_job_duration_seconds",
            "Receive to settle",
            ["type"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "klein_stage_duration_seconds",
            "Time per job stage",
            ["stage"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "klein_queue_wait_seconds",
            "SentTimestamp to receive",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.gpu_seconds = Counter(
            "klein_gpu_seconds", "Seconds jobs held the model (GPU lock)", ["type"], registry=self.registry
        )
        self.cost_usd = Counter(
            "klein_job_cost_usd", "Jobs' share of PRICE_PER_HOUR, USD", ["type"], registry=self.registry
        )
        self.model_load = Gauge("klein_model_load_seconds", "Model load + warm-up", registry=self.registry)
        self.model_loaded = Gauge(
            "klein_model_loaded", "1 while the generation model is in memory", registry=self.registry
        )
        self.registry.register(_GpuMemoryCollector(gpu_memory))
        # The runner's receives (written by its poll loop): a worker that never polled is not healthy.
        self.polls = polls if polls is not None else PollHealth()
        self.booted = False
        self.loaded: Callable[[], bool] = lambda: False
        self.boot: dict[str, Any] = {}  # boot phases and compile-cache state, as in the ready log line
        self._server: ThreadingHTTPServer | None = None

    # -- observations ------------------------------------------------------------------------

    def model_ready(
        self,
        load_seconds: float,
        *,
        loaded: Callable[[], bool] | None = None,
        boot: dict[str, Any] | None = None,
    ) -> None:
        """Boot is done and jobs can be taken. ``loaded`` says whether the generation model is in
        memory (with PRELOAD_MODELS=false it loads with the first generate job); default: it is.
        ``boot``: the boot phases (seconds) and compile-cache state, shown by /healthz."""
        self.model_load.set(load_seconds)
        self.boot = boot if boot is not None else {}
        self.booted = True
        self.loaded = loaded or (lambda: True)
        self.model_loaded.set_function(lambda: 1.0 if self.loaded() else 0.0)

    def observe(self, status: str, fields: dict[str, Any]) -> None:
        job_type = fields.get("type") or "unknown"
        self.jobs.labels(type=job_type, status=status).inc()
        if isinstance(fields.get("duration_ms"), int):
            self.job_seconds.labels(type=job_type).observe(fields["duration_ms"] / 1000)
        if isinstance(fields.get("queue_wait_ms"), int) and fields.get("attempt") == 1:
            self.queue_wait.observe(fields["queue_wait_ms"] / 1000)
        for name, counter in (("gpu_seconds", self.gpu_seconds), ("cost_usd", self.cost_usd)):
            if isinstance(fields.get(name), float | int):
                counter.labels(type=job_type).inc(fields[name])
        for stage in STAGES:
            value = fields.get(f"timing_{stage}_ms")
            if isinstance(value, int):
                self.stage_seconds.labels(stage=stage).observe(value / 1000)

    # -- health ------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        loaded = self.loaded()
        last = self.polls.last_ok()
        age = None if last is None else time.monotonic() - last
        failures = self.polls.failures()
        queue_ok = age is not None and age < HEALTHY_POLL_AGE and failures == 0
        return self.booted and queue_ok, {
            "booted": self.booted,
            "model_loaded": loaded,
            "queue_reachable": queue_ok,
            "last_poll_age_s": None if age is None else round(age, 1),
            "receive_failures": failures,
            "boot": self.boot,
        }

    # -- server ------------------------------------------------------------------------------

    def serve(self, port: int, host: str = "0.0.0.0") -> int:  # all interfaces: scraped from outside
        telemetry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # scrapes every few seconds: not worth a log line
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/healthz"):
                    ready, detail = telemetry.health()
                    self._reply(
                        200 if ready else 503,
                        json.dumps({"ready": ready, **detail}).encode(),
                        "application/json",
                    )
                elif self.path.startswith("/metrics"):
                    self._reply(200, generate_latest(telemetry.registry), CONTENT_TYPE_LATEST)
                else:
                    self._reply(404, b"not found", "text/plain")

            def _reply(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        bound = int(self._server.server_address[1])
        log.info("metrics and /healthz on port %d", bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
