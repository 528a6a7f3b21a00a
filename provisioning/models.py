"""Plain data shared by the client, the policy, the reconciler and the simulator, and what an instance's
Vast status means to the fleet.

No I/O here: ``vast.py`` parses API replies into these, ``policy.py`` reads them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

_OFFLINE_STATUSES = {"offline", "unknown"}  # "unknown": no heartbeat from the host; it never comes back
# What Docker says in Vast's status_msg when an image cannot be pulled: no retry will make it pullable.
_UNPULLABLE = re.compile(
    r"pull access denied|manifest unknown|manifest for \S+ not found|repository does not exist"
    r"|invalid reference format|unauthorized: authentication required|denied: requested access",
    re.IGNORECASE,
)


class Phase(StrEnum):
    """What an instance means to the fleet, derived from its Vast status and age."""

    BOOTING = "booting"  # provisioning, pulling the image, loading the model: capacity soon
    RUNNING = "running"  # the worker is up: capacity now
    STUCK = "stuck"  # still loading past the boot deadline
    EXITED = "exited"  # container exited: it will not come back by itself
    OFFLINE = "offline"  # host lost (offline, or no heartbeat: "unknown")
    OUTBID = "outbid"  # interruptible instance stopped by a higher bid
    STOPPED = "stopped"  # stopped or frozen by someone else (ours are COLD)
    COLD = "cold"  # stopped by the fleet into the cold pool: disk kept, storage billed, not capacity
    RESUMING = "resuming"  # asked to resume: capacity soon, unless the GPU was taken meanwhile
    RESUME_HUNG = "resume_hung"  # still not running past the resume deadline: destroy, rent instead
    UNREADY = "unready"  # running, but its worker never became ready (or stopped being ready)
    UNPULLABLE = "unpullable"  # Vast says the image cannot be pulled: it never will

    @property
    def is_capacity(self) -> bool:
        return self in (Phase.BOOTING, Phase.RUNNING, Phase.RESUMING)


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """One rentable machine bundle from ``POST /api/v0/bundles/``."""

    id: int
    machine_id: int
    host_id: int
    gpu_name: str
    num_gpus: int
    gpu_ram_mb: int  # per GPU, as Vast reports it
    dph_total: float  # on-demand $/h for the whole bundle
    min_bid: float | None = None  # interruptible floor, $/h for the whole bundle
    dlperf: float | None = None  # Vast's deep-learning performance score (whole bundle)
    reliability: float = 0.0
    verified: bool = False
    cuda_max_good: float = 0.0
    disk_space_gb: float = 0.0
    inet_down_mbps: float = 0.0
    geolocation: str = ""

    @property
    def price_per_gpu_hour(self) -> float:
        return self.dph_total / max(1, self.num_gpus)


@dataclass(frozen=True, slots=True, kw_only=True)
class Instance:
    """One rented instance from the instance list."""

    id: int
    label: str | None
    image: str | None
    machine_id: int | None
    host_id: int | None
    gpu_name: str
    num_gpus: int
    dph_total: float  # what it costs now, $/h
    actual_status: str | None  # None while provisioning
    intended_status: str | None
    status_msg: str
    started_at: float | None  # epoch seconds (Vast's start_date); None until Vast has scheduled it
    is_bid: bool = False
    dlperf: float | None = None
    storage_dph: float = 0.0  # $/h of its disk alone: all a stopped instance bills
    public_ip: str | None = None
    ports: Mapping[str, int] = field(default_factory=dict)  # container "9090/tcp" -> host port

    @property
    def hourly_cost(self) -> float:
        """What it bills now: the disk alone once stopped, else the full price."""
        stopped = (self.actual_status or "").lower() == "stopped"
        return self.storage_dph if stopped and (self.intended_status or "") == "stopped" else self.dph_total


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueDepth:
    """One of the fleet's job queues at one moment."""

    url: str
    visible: int
    in_flight: int
    delayed: int = 0
    target_wait_s: float | None = None  # None: the fleet's target wait

    @property
    def backlog(self) -> int:
        return self.visible + self.in_flight

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueSample:
    """The job queues at one moment (SQS approximate counts): totals, and each queue, highest first."""

    at: float  # epoch seconds
    visible: int  # waiting to be received
    in_flight: int  # received by a worker, not yet deleted
    delayed: int = 0  # retries waiting out their backoff
    queues: tuple[QueueDepth, ...] = ()  # per queue, highest priority first; empty: one unnamed queue

    @property
    def backlog(self) -> int:
        return self.visible + self.in_flight

    def required_rate(self, target_wait_s: float) -> float:
        """Jobs per second the fleet must serve for every queue to be worked off within its target wait.

        Workers take a higher queue's jobs first (QUEUE_URLS), so a queue's jobs wait behind the backlog
        of every queue above it: the rate is the largest (backlog of the queue and those above) / (its
        target wait). With one queue, or no per-queue targets, it is backlog / target wait.
        """
        if not self.queues:
            return self.backlog / target_wait_s
        rate, ahead = 0.0, 0
        for queue in self.queues:
            ahead += queue.backlog
            rate = max(rate, ahead / (queue.target_wait_s or target_wait_s))
        return rate

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QueueSample:
        """From ``dataclasses.asdict`` output (the state file)."""
        queues = tuple(QueueDepth(**q) for q in data.get("queues", ()))
        return cls(**{**data, "queues": queues})


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingRent:
    """A rent whose outcome is unknown (timeout): counted as booting capacity and cost until it shows up."""

    offer_id: int
    machine_id: int
    dph_total: float
    num_gpus: int
    gpu_name: str
    requested_at: float
    expires_at: float


def same_image(a: str | None, b: str) -> bool:
    """``ghcr.io/x/y`` equals ``ghcr.io/x/y:latest``; ``docker.io/`` is implied."""

    def norm(ref: str) -> str:
        ref = ref.strip().removeprefix("docker.io/")
        tail = ref.rsplit("/", 1)[-1]
        return ref if ":" in tail or "@" in ref else f"{ref}:latest"

    return a is not None and norm(a) == norm(b)


def classify(instance: Instance, *, now: float, boot_deadline_s: float) -> Phase:
    status = (instance.actual_status or "").lower()
    if status == "running":
        return Phase.RUNNING
    if status == "exited":
        return Phase.EXITED
    if status in _OFFLINE_STATUSES:
        return Phase.OFFLINE
    if status != "running" and _UNPULLABLE.search(instance.status_msg):
        return Phase.UNPULLABLE
    if status in ("stopped", "frozen"):
        outbid = instance.is_bid or "outbid" in instance.status_msg.lower()
        return Phase.OUTBID if outbid else Phase.STOPPED
    # Provisioning, loading, rebooting, and any status Vast may add later: booting until the deadline.
    return Phase.BOOTING if now - started(instance, now) <= boot_deadline_s else Phase.STUCK


def started(instance: Instance, now: float) -> float:
    """When the instance started; one Vast has not dated yet (no start_date) counts as starting now.

    The autoscaler fills in the time it first saw such a row (``FleetMemory.first_seen``), so a row that
    stays undated still reaches the boot deadline, counted from when it appeared.
    """
    return now if instance.started_at is None else instance.started_at
