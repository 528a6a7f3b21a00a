"""What the scaling policy is given: its tuning (``PolicyConfig``) and what was observed (``Observation``).

Apart from ``policy.py`` so that the modules the policy calls (``fleetview``, ``sizing``) can name these
types without importing the policy back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from provisioning.models import Instance, Offer, PendingRent, QueueSample


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    image: str  # the worker image: labelled instances running anything else are "unknown"
    min_instances: int = 0
    max_instances: int = 10
    target_wait_s: float = 120.0
    max_hourly_usd: float = 5.0
    scale_in_after_s: float = 300.0  # a surplus must last this long before anything is destroyed
    min_instance_age_s: float = 600.0  # running instances younger than this are never scaled in
    boot_deadline_s: float = 1200.0  # still loading after this long: destroy and replace
    avoid_machine_s: float = 3600.0  # how long a failed instance's machine is not rented again
    max_rents_per_tick: int = 4  # scale-out rate limit
    max_per_host: int = 2
    images_per_job: float = 1.0  # average images per job (batches), to turn images/s into jobs/s
    manual: bool = False  # `scale --to N`: no surplus window, no age or busy guard, no pool fill
    cold_pool: int = 0  # stopped instances kept to resume on scale-out (coldpool.py): the floor
    cold_mult: float = 0.0  # ... or this many per live instance, when more (coldpool.pool_size)
    cold_max_age_s: float = 6 * 3600.0  # a cold instance stopped longer than this is destroyed
    resume_deadline_s: float = 300.0  # a resume not running by then is destroyed and a rent made
    fill_cold_pool: bool = True  # when demand is met, rent to fill the pool (they boot, then stop)
    unready_after_s: float = 180.0  # a worker that stopped answering /healthz this long is replaced


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    now: float
    samples: Sequence[QueueSample]  # oldest first; the last is the current one; empty without a queue
    instances: Sequence[Instance]  # every instance carrying the fleet label
    offers: Sequence[Offer]
    avoid: Mapping[int, float] = field(default_factory=dict)  # machine id -> avoid until (epoch s)
    pending: Sequence[PendingRent] = ()
    resumed: Mapping[int, float] = field(default_factory=dict)  # instance id -> resume asked at
    cold_since: Mapping[int, float] = field(default_factory=dict)  # instance id -> stopped at
    last_ready: Mapping[int, float] | None = None  # id -> last /healthz 200; None: readiness not probed
    image_hold: str = ""  # the status_msg that showed config.image cannot be pulled: no rents until cleared
