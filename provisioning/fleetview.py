"""The policy's reading of an observation: each managed instance's phase (Vast status, cold pool,
readiness), the failed ones to replace, machines to avoid, rents still pending, and the $/h now.

``policy.py`` decides from this; keeping the reading apart keeps the decision readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from provisioning import coldpool, readiness
from provisioning.models import Instance, PendingRent, Phase, classify, same_image, started

if TYPE_CHECKING:
    from provisioning.policy_inputs import Observation, PolicyConfig

_PENDING_MATCH_SLACK_S = 120.0  # clock skew between us and Vast when matching a late rent to its instance


@dataclass(frozen=True, slots=True, kw_only=True)
class Destroy:
    instance: Instance
    reason: str  # a Phase value for failures, "scale_in" or "over_budget"


@dataclass(slots=True, kw_only=True)
class Fleet:
    """What the observation says about the fleet, before any scaling."""

    live: list[Instance]  # booting, resuming or running: capacity
    cold: list[Instance]  # stopped by us: not capacity, storage billed
    running: list[Instance]
    phases: dict[int, Phase]
    failed: list[Destroy]
    avoid: dict[int, float]
    pending: list[PendingRent]
    hourly_now: float

    @property
    def capacity(self) -> int:
        return len(self.live) + len(self.pending)


def observe(obs: Observation, config: PolicyConfig) -> Fleet:
    now = obs.now
    managed = [i for i in obs.instances if same_image(i.image, config.image)]
    phases = {i.id: _phase(i, obs, config) for i in managed}
    failed = [
        Destroy(instance=i, reason=str(phases[i.id]))
        for i in managed
        if not phases[i.id].is_capacity and phases[i.id] is not Phase.COLD
    ]
    avoid = {m: t for m, t in obs.avoid.items() if t > now}
    for d in failed:
        # An unpullable image is the image's fault, not the machine's.
        if d.instance.machine_id is not None and phases[d.instance.id] is not Phase.UNPULLABLE:
            avoid[d.instance.machine_id] = now + config.avoid_machine_s
    live = [i for i in managed if phases[i.id].is_capacity]
    pending = _live_pending(obs.pending, managed, now)
    return Fleet(
        live=live,
        cold=[i for i in managed if phases[i.id] is Phase.COLD],
        running=[i for i in live if phases[i.id] is Phase.RUNNING],
        phases=phases,
        failed=failed,
        avoid=avoid,
        pending=pending,
        hourly_now=sum(i.hourly_cost for i in obs.instances) + sum(p.dph_total for p in pending),
    )


def _phase(instance: Instance, obs: Observation, config: PolicyConfig) -> Phase:
    cold = coldpool.cold_phase(
        instance, resumed=obs.resumed, now=obs.now, resume_deadline_s=config.resume_deadline_s
    )
    phase = cold or classify(instance, now=obs.now, boot_deadline_s=config.boot_deadline_s)
    if phase is not Phase.RUNNING or obs.last_ready is None:
        return phase
    return readiness.phase(
        instance,
        now=obs.now,
        started_at=obs.resumed.get(instance.id, started(instance, obs.now)),
        last_ready=obs.last_ready,
        boot_deadline_s=config.boot_deadline_s,
        unready_after_s=config.unready_after_s,
    )


def _live_pending(
    pending: Sequence[PendingRent], managed: Sequence[Instance], now: float
) -> list[PendingRent]:
    """Pending rents that have neither expired nor turned up as an instance on their machine."""

    def arrived(p: PendingRent) -> bool:
        return any(
            i.machine_id == p.machine_id and started(i, now) >= p.requested_at - _PENDING_MATCH_SLACK_S
            for i in managed
        )

    return [p for p in pending if p.expires_at > now and not arrived(p)]
