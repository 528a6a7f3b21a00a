"""One autoscaling tick (observe -> decide -> apply -> remember) and the loop around it."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests
from botocore.exceptions import BotoCoreError, ClientError

from provisioning import readiness
from provisioning.backlog import SqsBacklog
from provisioning.models import Instance, same_image
from provisioning.offers import OfferRequirements
from provisioning.policy import Decision, Observation, PolicyConfig, decide
from provisioning.reconcile import Action, ApplyReport, Reconciler
from provisioning.state import FleetMemory, StateFile
from provisioning.throughput import ThroughputModel
from provisioning.vast import VastAuthError, VastClient, VastError

log = logging.getLogger(__name__)

# What one failed tick may raise; the loop logs it and tries again at the next interval.
TICK_ERRORS = (VastError, requests.RequestException, BotoCoreError, ClientError, OSError)


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    observation: Observation
    decision: Decision
    report: ApplyReport


class Autoscaler:
    def __init__(
        self,
        *,
        vast: VastClient,
        backlog: SqsBacklog | None,
        label: str,
        policy: PolicyConfig,
        requirements: OfferRequirements,
        throughput: ThroughputModel,
        reconciler: Reconciler | None,
        memory: FleetMemory | None = None,
        state: StateFile | None = None,
        clock: Callable[[], float] = time.time,
        health_port: int = 0,
    ) -> None:
        self._health_port = health_port  # the workers' /healthz port; 0: readiness not probed
        self._vast = vast
        self._backlog = backlog
        self._label = label
        self._policy = policy
        self._requirements = requirements
        self._throughput = throughput
        self._reconciler = reconciler
        self._state = state
        self.memory = memory if memory is not None else (state.load() if state else FleetMemory())
        self._clock = clock

    def observe(self) -> Observation:
        now = self._clock()
        # Vast first: a refused key ends the run before anything else is asked.
        instances = self._date_undated(self._vast.list_instances(label=self._label), now)
        if self._backlog is not None:
            self.memory.remember(self._backlog.sample(now=now), keep_s=self._policy.scale_in_after_s)
        offers = self._vast.search_offers(self._requirements.to_query())
        return Observation(
            now=now,
            samples=list(self.memory.samples),
            instances=instances,
            offers=offers,
            avoid=dict(self.memory.avoid),
            pending=list(self.memory.pending),
            resumed=dict(self.memory.resumed),
            cold_since=self._cold_since(instances, now),
            last_ready=self._probe(instances, now),
            image_hold=self.memory.image_hold.get(self._policy.image, ""),
        )

    def _date_undated(self, instances: list[Instance], now: float) -> list[Instance]:
        """Give rows without a start_date the time they were first listed, so the boot deadline counts
        from then: neither "stuck" at once (age since 1970) nor booting forever."""
        undated = {i.id for i in instances if i.started_at is None}
        self.memory.first_seen = {k: v for k, v in self.memory.first_seen.items() if k in undated}
        return [
            dataclasses.replace(i, started_at=self.memory.first_seen.setdefault(i.id, now))
            if i.started_at is None
            else i
            for i in instances
        ]

    def _probe(self, instances: list[Instance], now: float) -> dict[int, float] | None:
        """Ask each running worker's /healthz; remember when each last answered 200."""
        if not self._health_port:
            return None
        listed = {i.id for i in instances}
        self.memory.last_ready = {k: v for k, v in self.memory.last_ready.items() if k in listed}
        for iid, ok in readiness.probe(instances, port=self._health_port).items():
            if ok:
                self.memory.last_ready[iid] = now
        return dict(self.memory.last_ready)

    def _cold_since(self, instances: list[Instance], now: float) -> dict[int, float]:
        """When each stopped instance went cold; one stopped before we knew (a lost state file) from now."""
        stopped = {i.id for i in instances if (i.intended_status or "") == "stopped"}
        self.memory.cold_since = {k: v for k, v in self.memory.cold_since.items() if k in stopped}
        for iid in stopped:
            self.memory.cold_since.setdefault(iid, now)
        return dict(self.memory.cold_since)

    def retry_image(self) -> None:
        """Lift the hold on rents after an unpullable image (the operator fixed the image or its access)."""
        self.memory.image_hold.pop(self._policy.image, None)

    def plan(self) -> tuple[Observation, Decision]:
        obs = self.observe()
        decision = decide(
            obs, config=self._policy, requirements=self._requirements, throughput=self._throughput
        )
        return obs, decision

    def tick(self, *, dry_run: bool) -> Tick:
        if self._reconciler is None:
            raise RuntimeError("this autoscaler was built to plan only")
        obs, decision = self.plan()
        report = self._reconciler.apply(decision, dry_run=dry_run)
        if not dry_run:
            # Only what really happened is remembered: a dry run leaves the state file untouched.
            self.memory.avoid = dict(decision.avoid)
            self.memory.pending = list(report.pending)
            # Kept for this image only: deploying another image lifts the hold.
            hold = decision.image_hold
            self.memory.image_hold = {self._policy.image: hold} if hold else {}
            self._remember_moves(obs, report)
            if self._state is not None:
                self._state.save(self.memory)
        for action in report.actions:
            log.info("%s %s (%s): %s", action.kind, action.target, action.reason, action.outcome)
        return Tick(observation=obs, decision=decision, report=report)

    def _remember_moves(self, obs: Observation, report: ApplyReport) -> None:
        """Resumes are followed until the instance runs or goes; stops start the cold-age clock."""
        listed = {i.id for i in obs.instances}
        if obs.last_ready is None:
            done = {i.id for i in obs.instances if (i.actual_status or "") == "running"}
        else:  # followed until its worker answers, so the boot deadline counts from the resume
            done = {k for k, t in obs.last_ready.items() if t >= self.memory.resumed.get(k, t)}
        self.memory.resumed = {k: v for k, v in self.memory.resumed.items() if k in listed and k not in done}
        for iid in report.resumed:
            self.memory.resumed[iid] = obs.now
            self.memory.cold_since.pop(iid, None)
        for iid in report.stopped:
            self.memory.cold_since[iid] = obs.now
            self.memory.last_ready.pop(iid, None)
            self.memory.resumed.pop(iid, None)  # a resume taken back: cold again, not resuming

    def run(
        self,
        *,
        interval_s: float,
        dry_run: bool,
        on_tick: Callable[[Tick], None],
        stop: threading.Event | None = None,
    ) -> None:
        """Tick every ``interval_s`` until ``stop`` is set; a failed tick is logged and retried next time."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                on_tick(self.tick(dry_run=dry_run))
            except VastAuthError:
                raise  # a wrong key stays wrong: end the run instead of failing every tick
            except TICK_ERRORS:
                log.exception("autoscale tick failed; next try in %.0fs", interval_s)
            stop.wait(interval_s)


def destroy_fleet(
    vast: VastClient, *, label: str, image: str, include_unknown: bool, dry_run: bool
) -> list[Action]:
    """Destroy every instance of the fleet (and labelled strangers when asked). Workers drain on SIGTERM."""
    actions = []
    for inst in vast.list_instances(label=label):
        ours = same_image(inst.image, image)
        target = f"instance {inst.id} ({inst.gpu_name}, {inst.actual_status or 'provisioning'})"
        if not ours and not include_unknown:
            actions.append(
                Action(kind="destroy", target=target, reason="unknown image", outcome="left alone")
            )
            continue
        if dry_run:
            outcome = "dry run"
        else:
            try:
                outcome = "destroyed" if vast.destroy_instance(inst.id) else "already gone"
            except VastAuthError:
                raise
            except VastError as exc:
                outcome = f"failed: {exc}"
        actions.append(Action(kind="destroy", target=target, reason="destroy --all", outcome=outcome))
    return actions
