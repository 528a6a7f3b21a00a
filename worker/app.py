"""Composition: settings -> clients -> engines -> runner. No logic of its own beyond wiring."""

from __future__ import annotations

import functools
import logging
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from handlers.dispatch import HANDLERS
from handlers.engine_set import Engines
from handlers.schemas import Limits
from klein_facts.jobs import DEFAULT_HEIGHT, DEFAULT_MAX_REFERENCES, DEFAULT_WIDTH
from klein_facts.profile import BenchmarkProfile, served_latency
from worker.boot import build_engines
from worker.config import Settings
from worker.execute import JobExecutor
from worker.gpu import GpuInfo, probe_gpus
from worker.hub_files import HubFiles
from worker.poll_health import PollHealth
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


class Booted(NamedTuple):
    """What boot made: the engines, and the job limits from the benchmark profile that chose their
    variant. BENCHMARK_PROFILE is read once, here, so the two cannot come from different profiles
    (a folder's files changed after boot, or another NVML reading) and boot probes NVML once."""

    engines: Engines
    limits: Limits


def boot_engines(settings: Settings) -> Booted:
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
    profile = read_profile(settings, gpus)
    if profile is not None:
        latency = served_latency(profile)
        log.info(
            "benchmark profile: %s on %s, %s s/image at %dx%d%s",
            profile.variant.label,
            profile.gpu.name if profile.gpu else "no GPU",
            "?" if latency is None else f"{latency:.3f}",
            DEFAULT_WIDTH,
            DEFAULT_HEIGHT,
            " compiled" if profile.settings.compiled else "",
        )
    limits = profile_limits(settings, profile)
    return Booted(build_engines(settings, choose_variant(settings, gpus, profile)), limits)


def limits_for(settings: Settings, gpus: list[GpuInfo] | None = None) -> Limits:
    """``profile_limits`` of the profile BENCHMARK_PROFILE gives for ``gpus`` (from a folder: the one
    ``choose_profile`` takes for this card; NVML is probed when ``gpus`` is None)."""
    return profile_limits(settings, read_profile(settings, gpus))


def profile_limits(settings: Settings, profile: BenchmarkProfile | None) -> Limits:
    """MAX_REFERENCES (and MAX_BATCH, when not set) default from the benchmark profile's measurements;
    a profile that fits nothing gives none."""
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


def job_source(settings: Settings, *, sqs_client: Any | None = None) -> JobSource:
    """The queues of QUEUE_URL(S) as one source: SQS, behind the priority sweep when there are several."""
    client = sqs_client or _sqs_client(settings)
    sources = [
        SqsJobSource(client=client, queue_url=url, visibility_timeout=settings.visibility_timeout)
        for url in settings.require_queues()
    ]
    if len(sources) == 1:
        return sources[0]
    return PriorityJobSource(sources=sources, lower_share=settings.lower_queue_share)


def build_runner(
    settings: Settings,
    *,
    engines: Engines,
    sqs_client: Any | None = None,
    source: JobSource | None = None,
    polls: PollHealth | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    on_idle_exit: Callable[[], object] | None = None,
    on_abandon: Callable[[], None] | None = None,
    limits: Limits | None = None,
) -> Runner:
    """The runner for ``settings``. ``source`` replaces the job source of QUEUE_URL(S) (a benchmark
    wraps ``job_source`` to take timestamps); ``polls`` receives the runner's poll health (/healthz
    reads it); ``on_event``, ``on_idle_exit`` and ``on_abandon`` are the runner's hooks; ``limits``
    are the job limits boot derived (``boot_engines``), read from BENCHMARK_PROFILE here when None."""
    settings.require_queues()
    client = sqs_client or _sqs_client(settings)
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
        handlers=HANDLERS,
        engines=engines,
        transfer=transfer,
        limits=limits if limits is not None else limits_for(settings),
        worker_id=settings.worker_id,
        max_attempts=settings.max_attempts,
        retry_backoff_seconds=settings.retry_backoff_seconds,
        price_per_hour=settings.price_per_hour,
    )
    return Runner(
        source=source or job_source(settings, sqs_client=client),
        publisher=ResultPublisher(sink=sink, poster=transfer, webhook_secret=secret),
        executor=executor,
        concurrency=settings.job_concurrency,
        visibility_timeout=settings.visibility_timeout,
        wait_time_seconds=settings.wait_time_seconds,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
        idle_shutdown_seconds=settings.idle_shutdown_seconds,
        on_idle_exit=on_idle_exit,
        on_abandon=on_abandon,
        on_event=on_event,
        polls=polls,
    )


def _sqs_client(settings: Settings) -> Any:
    return make_sqs_client(region=settings.aws_region, endpoint_url=settings.aws_endpoint_url)


def serve(settings: Settings) -> Runner:
    """The production path: metrics endpoint first (it answers 503 while loading), boot, then poll."""
    settings.require_queues()
    stopper = install_signal_handlers()
    polls = PollHealth()
    telemetry = None
    if settings.metrics_port is not None:
        telemetry = Telemetry(polls=polls)
        telemetry.serve(settings.metrics_port)
    started = time.perf_counter()
    engines, limits = boot_engines(settings)
    if telemetry is not None:
        telemetry.model_ready(
            time.perf_counter() - started, loaded=lambda: engines.klein is not None, boot=engines.boot
        )
    runner = build_runner(
        settings,
        engines=engines,
        polls=polls,
        on_event=telemetry.observe if telemetry is not None else None,
        on_idle_exit=_destroy_on_idle(settings),
        limits=limits,
    )
    stopper.attach(runner)
    runner.run()
    log.info("worker stopped after %d job(s)", runner.processed)
    return runner


def _destroy_on_idle(settings: Settings) -> Callable[[], object] | None:
    """With IDLE_SHUTDOWN_SECONDS on a Vast instance that knows its own id and key: destroy it."""
    if not (settings.idle_shutdown_seconds and settings.container_id and settings.container_api_key):
        return None
    return functools.partial(
        destroy_own_instance,
        api_url=settings.vast_api_url,
        container_id=settings.container_id,
        api_key=settings.container_api_key.get_secret_value(),
    )


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
