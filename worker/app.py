"""Composition: settings -> clients -> engines -> runner. No logic of its own beyond wiring."""

from __future__ import annotations

import functools
import logging
import signal
import time
from typing import Any

from handlers.dispatch import Engines, handler_table
from handlers.schemas import Limits
from klein_facts.jobs import DEFAULT_MAX_REFERENCES
from worker.boot import build_engines
from worker.config import Settings
from worker.execute import JobExecutor
from worker.gpu import probe_gpus
from worker.hub_files import HubFiles
from worker.priority import PriorityJobSource
from worker.queue import JobSource
from worker.results import ResultPublisher
from worker.runner import Runner
from worker.sqs import SqsJobSource, SqsResultSink, make_sqs_client
from worker.telemetry import Telemetry
from worker.transfer import TransferClient
from worker.variant import choose_variant, read_profile
from worker.vast_self import destroy_own_instance

log = logging.getLogger(__name__)


def boot_engines(settings: Settings) -> Engines:
    profile = read_profile(settings)
    gpus = probe_gpus(settings.cuda_visible_devices)
    for gpu in gpus:
        log.info(
            "GPU %d: %s, %.1f GiB total, %.1f GiB free, driver %s, CUDA %s",
            gpu.index,
            gpu.name,
            gpu.total_gib,
            gpu.free_gib,
            gpu.driver,
            gpu.cuda,
        )
    return build_engines(settings, choose_variant(settings, gpus, profile))


def limits_for(settings: Settings) -> Limits:
    """MAX_REFERENCES (and MAX_BATCH, when not set) default from the benchmark profile's measurements."""
    profile = read_profile(settings)
    measured = profile.limits if profile is not None and profile.recommendation.fits else None
    refs = settings.max_references
    if refs is None:
        refs = DEFAULT_MAX_REFERENCES
        if measured is not None and measured.max_references_default is not None:
            refs = measured.max_references_default
    batch = settings.max_batch
    if "max_batch" not in settings.model_fields_set and measured is not None and measured.max_batch:
        batch = min(batch, measured.max_batch)
    return Limits(max_batch=batch, max_references=refs, max_loras=settings.max_loras)


def build_runner(
    settings: Settings, *, engines: Engines, sqs_client: Any | None = None, **hooks: Any
) -> Runner:
    queue_urls = settings.require_queues()
    client = sqs_client or make_sqs_client(region=settings.aws_region, endpoint_url=settings.aws_endpoint_url)
    transfer = TransferClient(
        allow_private_urls=settings.allow_private_urls,
        max_download_bytes=settings.max_download_bytes,
        max_pixels=settings.max_download_pixels,
        hub=HubFiles(
            token=settings.hf_token.get_secret_value() if settings.hf_token else None,
            offline=settings.hf_hub_offline,
        ),
    )
    sink = (
        SqsResultSink(client=client, queue_url=settings.result_queue_url)
        if settings.result_queue_url
        else None
    )
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    executor = JobExecutor(
        handlers=handler_table(),
        engines=engines,
        transfer=transfer,
        limits=limits_for(settings),
        worker_id=settings.worker_id,
        max_attempts=settings.max_attempts,
        retry_backoff_seconds=settings.retry_backoff_seconds,
        price_per_hour=settings.price_per_hour,
    )
    sources = [
        SqsJobSource(client=client, queue_url=url, visibility_timeout=settings.visibility_timeout)
        for url in queue_urls
    ]
    source: JobSource = (
        sources[0]
        if len(sources) == 1
        else PriorityJobSource(sources=sources, lower_share=settings.lower_queue_share)
    )
    return Runner(
        source=source,
        publisher=ResultPublisher(sink=sink, poster=transfer, webhook_secret=secret),
        executor=executor,
        concurrency=settings.job_concurrency,
        visibility_timeout=settings.visibility_timeout,
        wait_time_seconds=settings.wait_time_seconds,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
        idle_shutdown_seconds=settings.idle_shutdown_seconds,
        **hooks,
    )


def serve(settings: Settings) -> Runner:
    """The production path: metrics endpoint first (it answers 503 while loading), boot, then poll."""
    settings.require_queues()
    stopper = install_signal_handlers()
    telemetry = None
    if settings.metrics_port is not None:
        telemetry = Telemetry()
        telemetry.serve(settings.metrics_port)
    started = time.perf_counter()
    engines = boot_engines(settings)
    hooks: dict[str, Any] = {}
    if settings.idle_shutdown_seconds and settings.container_id and settings.container_api_key:
        key = settings.container_api_key.get_secret_value()
        hooks["on_idle_exit"] = functools.partial(
            destroy_own_instance,
            api_url=settings.vast_api_url,
            container_id=settings.container_id,
            api_key=key,
        )
    if telemetry is not None:
        telemetry.model_ready(
            time.perf_counter() - started, loaded=lambda: engines.klein is not None, boot=engines.boot
        )
        hooks["on_event"] = telemetry.observe
    runner = build_runner(settings, engines=engines, **hooks)
    if telemetry is not None:
        telemetry.last_poll_ok = lambda: runner.last_poll_ok
        telemetry.poll_failures = lambda: runner.poll_failures
    stopper.attach(runner)
    runner.run()
    log.info("worker stopped after %d job(s)", runner.processed)
    return runner


class _Stopper:
    """SIGTERM/SIGINT at any point: during boot nothing is in hand, so exit 0 at once;
    once the runner exists, drain it."""

    def __init__(self) -> None:
        self._runner: Runner | None = None

    def attach(self, runner: Runner) -> None:
        self._runner = runner

    def __call__(self, signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        if self._runner is None:
            raise SystemExit(0)
        self._runner.request_stop()


def install_signal_handlers() -> _Stopper:
    stopper = _Stopper()
    signal.signal(signal.SIGTERM, stopper)
    signal.signal(signal.SIGINT, stopper)
    return stopper
