"""How many instances the queue needs: backlog over throughput times the target wait (pure).

``policy.py`` decides which instances come and go; this module only says how many, and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from provisioning.models import Instance, QueueSample
from provisioning.offers import RankedOffer
from provisioning.throughput import ThroughputModel

if TYPE_CHECKING:
    from provisioning.policy_inputs import PolicyConfig


def target_size(sample: QueueSample, *, jobs_per_s: float, gpus: float, config: PolicyConfig) -> int:
    """clamp(max(ceil(backlog / (jobs/s per instance x target wait)), instances busy now), min, max)."""
    rate = sample.required_rate(config.target_wait_s)  # per-queue target waits, highest queue first
    drain = math.ceil(rate / jobs_per_s - 1e-9) if sample.backlog else 0
    # Workers holding messages are busy: keep at least that many instances, or a fleet that has just caught
    # up with a steady load would look like a surplus and shrink, and the backlog would build again.
    busy = _busy_instances(sample.in_flight, gpus)
    return max(config.min_instances, min(config.max_instances, max(drain, busy)))


def _busy_instances(in_flight: int, gpus: float) -> int:
    """Instances whose workers are all holding a message (one worker per GPU)."""
    return math.ceil(in_flight / max(gpus, 1.0) - 1e-9)


def reference_instance(
    live: Sequence[Instance], ranked: Sequence[RankedOffer], throughput: ThroughputModel, config: PolicyConfig
) -> tuple[float, float]:
    """(jobs/s, GPUs) of an average instance: the fleet's, else the best offer's, else the default."""
    per_instance = [throughput.for_instance(i).images_per_second for i in live]
    gpus = [float(max(1, i.num_gpus)) for i in live]
    if not per_instance and ranked:
        per_instance, gpus = [ranked[0].estimate.images_per_second], [float(max(1, ranked[0].offer.num_gpus))]
    if not per_instance:
        per_instance, gpus = (
            [throughput.estimate(gpu_name="", num_gpus=1, dlperf=None).images_per_second],
            [1.0],
        )
    ips = sum(per_instance) / len(per_instance)
    return ips / config.images_per_job, sum(gpus) / len(gpus)


def explain(
    sample: QueueSample | None, desired: int, *, jobs_per_s: float, gpus: float, config: PolicyConfig
) -> str:
    if config.manual:
        return f"fixed at {desired} by `scale --to`"
    if sample is None:
        return f"no queue sample: the minimum, {desired}"
    rate = sample.required_rate(config.target_wait_s)
    busy = _busy_instances(sample.in_flight, gpus)
    need = (
        f"{rate:.2f} jobs/s to meet each queue's target wait (a queue waits behind those above it)"
        if len(sample.queues) > 1
        else f"backlog {sample.backlog} (visible {sample.visible} + in flight {sample.in_flight}) / "
        f"{config.target_wait_s:.0f}s target wait = {rate:.2f} jobs/s"
    )
    return (
        f"{need} / {jobs_per_s:.2f} jobs/s per instance = {rate / jobs_per_s:.2f}; "
        f"instances busy now: {busy}; within [{config.min_instances}, {config.max_instances}] -> {desired}"
    )


def sustained(
    samples: Sequence[QueueSample],
    size: Callable[[QueueSample], int],
    now: float,
    config: PolicyConfig,
    capacity: int,
    notes: list[str],
) -> int:
    """The largest target over the last ``scale_in_after_s``; no shrink until history covers it."""
    start = now - config.scale_in_after_s
    # The last sample at or before the window start counts too (it held until the window began), but one
    # from long before (the autoscaler was stopped for a day) says nothing about the window.
    before = [k for k, s in enumerate(samples) if start - config.scale_in_after_s <= s.at <= start]
    if not before:
        notes.append(
            f"surplus: waiting for {config.scale_in_after_s:.0f}s of queue history before scaling in"
        )
        return capacity
    return max(size(s) for s in samples[before[-1] :])


def all_busy(sample: QueueSample, running: Sequence[Instance]) -> bool:
    slots = sum(max(1, i.num_gpus) for i in running)
    return sample.visible > 0 and slots > 0 and sample.in_flight >= slots
