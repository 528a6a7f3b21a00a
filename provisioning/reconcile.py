"""Applies a policy decision to Vast: destroys first, then rents, each rent checked against the $/h cap.

Destroying an instance makes Vast stop its container with SIGTERM; the worker stops receiving, finishes
or releases the jobs in hand (SPEC), and a message it could not release reappears when its visibility
timeout lapses. So a destroy never loses work, it only hands it to the rest of the fleet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from provisioning import coldpool
from provisioning.models import PendingRent
from provisioning.offers import RankedOffer
from provisioning.policy import Decision
from provisioning.vast import CreateOutcome, LaunchSpec, VastAuthError, VastClient, VastError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    kind: str  # "rent", "destroy", "stop" or "resume"
    target: str
    reason: str
    outcome: str


@dataclass(kw_only=True)
class ApplyReport:
    actions: list[Action] = field(default_factory=list)
    pending: list[PendingRent] = field(default_factory=list)
    hourly_after: float = 0.0
    stopped: list[int] = field(default_factory=list)  # instance ids now in the cold pool
    resumed: list[int] = field(default_factory=list)  # instance ids asked to resume


def describe_offer(item: RankedOffer) -> str:
    o = item.offer
    gpus = f"{o.num_gpus}x " if o.num_gpus > 1 else ""
    return f"offer {o.id} ({gpus}{o.gpu_name}, machine {o.machine_id}, host {o.host_id}, ${item.price:.3f}/h)"


# How long a rent of unknown outcome (the API call failed or timed out) counts as capacity.
PENDING_RENT_S = 900.0


class Reconciler:
    def __init__(
        self,
        *,
        client: VastClient,
        launch: LaunchSpec,
        max_hourly_usd: float,
        interruptible: bool = False,
        pending_rent_s: float = PENDING_RENT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._launch = launch
        self._cap = max_hourly_usd
        self._interruptible = interruptible
        self._pending_s = pending_rent_s
        self._clock = clock

    def apply(self, decision: Decision, *, dry_run: bool) -> ApplyReport:
        report = ApplyReport(pending=list(decision.pending))
        hourly = decision.hourly_now
        for d in decision.destroys:
            target = f"instance {d.instance.id} ({d.instance.gpu_name}, ${d.instance.dph_total:.3f}/h)"
            outcome = "dry run" if dry_run else self._destroy(d.instance.id)
            if not outcome.startswith("failed"):
                hourly -= d.instance.hourly_cost
            report.actions.append(Action(kind="destroy", target=target, reason=d.reason, outcome=outcome))
        hourly = self._stop_and_resume(decision, report, hourly, dry_run=dry_run)
        known = set(decision.phases) | {i.id for i in decision.unknown}
        spares = list(decision.alternates)
        used = {r.offer.machine_id for r in decision.rents}
        for item in decision.rents:
            candidate: RankedOffer | None = item
            while candidate is not None:
                if hourly + candidate.price > self._cap + 1e-9:
                    outcome, cost = f"skipped: over the ${self._cap:.2f}/h cap", 0.0
                elif dry_run:
                    outcome, cost = "dry run", candidate.price
                else:
                    outcome, cost = self._rent(candidate, known, report)
                report.actions.append(self._rent_action(candidate, outcome))
                hourly += cost
                # An offer that was gone (sold to someone else meanwhile): take the next-best one instead.
                candidate = _next_spare(spares, used) if outcome.startswith("rejected") else None
        report.hourly_after = hourly
        return report

    def _stop_and_resume(
        self, decision: Decision, report: ApplyReport, hourly: float, *, dry_run: bool
    ) -> float:
        """Stops into the cold pool, then resumes out of it (each within the cap); return the $/h after."""
        moves = [(i, "stopped", "scale_in: into the cold pool") for i in decision.stops]
        moves += [(i, "running", "resume from the cold pool") for i in decision.resumes]
        for inst, state, reason in moves:
            delta = coldpool.resume_cost(inst) * (1 if state == "running" else -1)
            target = f"instance {inst.id} ({inst.gpu_name}, ${inst.dph_total:.3f}/h)"
            kind = "resume" if state == "running" else "stop"
            if delta > 0 and hourly + delta > self._cap + 1e-9:
                outcome = f"skipped: over the ${self._cap:.2f}/h cap"
            elif dry_run:
                outcome = "dry run"
            else:
                outcome = self._set_state(inst.id, state)
            if outcome in ("stopped", "running", "dry run"):
                hourly += delta
                if outcome != "dry run":
                    (report.resumed if kind == "resume" else report.stopped).append(inst.id)
            report.actions.append(Action(kind=kind, target=target, reason=reason, outcome=outcome))
        return hourly

    def _set_state(self, instance_id: int, state: str) -> str:
        try:
            self._client.set_state(instance_id, state)
        except VastAuthError:
            raise
        except VastError as exc:
            log.error("setting instance %s %s failed: %s", instance_id, state, exc)
            return f"failed: {exc}"
        return state

    def _destroy(self, instance_id: int) -> str:
        try:
            return "destroyed" if self._client.destroy_instance(instance_id) else "already gone"
        except VastAuthError:
            raise
        except VastError as exc:
            log.error("destroy of instance %s failed: %s", instance_id, exc)
            return f"failed: {exc}"

    def _rent(self, item: RankedOffer, known: set[int], report: ApplyReport) -> tuple[str, float]:
        """Rent once, never blindly again; return (outcome text, $/h now committed)."""
        offer = item.offer
        started = self._clock()
        price = item.price if self._interruptible else None
        # One worker per GPU (docker/entrypoint.sh): each one's share of what the instance costs.
        launch = self._launch.priced(item.price / max(1, offer.num_gpus))
        result = self._client.create_instance(offer.id, launch, price=price)
        if result.outcome is CreateOutcome.RENTED:
            log.info("rented offer %s as instance %s", offer.id, result.instance_id)
            known.add(result.instance_id or -1)
            return f"rented: instance {result.instance_id}", item.price
        if result.outcome is CreateOutcome.REJECTED:
            log.info("offer %s rejected: %s", offer.id, result.message)
            return f"rejected: {result.message}", 0.0
        # Unknown: the request may have rented. Look for a new instance of ours on that machine.
        log.warning("rent of offer %s ended unclearly (%s): reconciling by label", offer.id, result.message)
        try:
            listed = self._client.list_instances(label=self._launch.label)
        except VastError as exc:
            log.warning("listing after an unclear rent failed: %s", exc)
            listed = []
        found = [i for i in listed if i.id not in known and i.machine_id == offer.machine_id]
        if found:
            known.add(found[0].id)
            return f"rented: instance {found[0].id} (found by listing after {result.message})", item.price
        report.pending.append(
            PendingRent(
                offer_id=offer.id,
                machine_id=offer.machine_id,
                dph_total=item.price,
                num_gpus=offer.num_gpus,
                gpu_name=offer.gpu_name,
                requested_at=started,
                expires_at=started + self._pending_s,
            )
        )
        return f"unknown ({result.message}): counted as pending, not retried", item.price

    @staticmethod
    def _rent_action(item: RankedOffer, outcome: str) -> Action:
        reason = f"${item.cost_per_1k_images:.3f}/1k images ({item.estimate.source})"
        return Action(kind="rent", target=describe_offer(item), reason=reason, outcome=outcome)


def _next_spare(spares: list[RankedOffer], used: set[int]) -> RankedOffer | None:
    while spares:
        item = spares.pop(0)
        if item.offer.machine_id not in used:
            used.add(item.offer.machine_id)
            return item
    return None
