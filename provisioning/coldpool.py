"""The cold pool: stopped instances that keep their disk (image layers, weights, compile cache) and resume
in about a minute instead of a fresh rent's image pull and model download (pure, like ``policy.py``).

Vast's serverless engine keeps such "cold workers" too. Here:

- scale-in stops up to ``cold_pool`` instances (the best cost per image among those leaving) and
  destroys the rest; a cold instance older than ``cold_max_age_s`` is destroyed;
- scale-out resumes cold instances first (best cost per image first), then rents;
- a resume waits in "scheduling" while someone else holds the GPU: past ``resume_deadline_s`` it is
  destroyed, its machine avoided, and a rent takes its place;
- a stopped instance is never capacity; it bills its disk (``storage_dph``), which counts in the $/h cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from provisioning.models import Instance, Phase

_RESUMABLE = {"running", "loading", "created", "scheduling", "stopped", ""}


def cold_phase(
    instance: Instance, *, resumed: Mapping[int, float], now: float, resume_deadline_s: float
) -> Phase | None:
    """The phase of a stopped or resuming instance of ours; None when the usual rules apply."""
    status = (instance.actual_status or "").lower()
    if instance.id in resumed:
        if status == "running":
            return Phase.RUNNING
        if status not in _RESUMABLE:
            return None  # exited, offline...: a failure like any other
        return Phase.RESUMING if now - resumed[instance.id] <= resume_deadline_s else Phase.RESUME_HUNG
    stopped_by_us = (instance.intended_status or "").lower() == "stopped" and not instance.is_bid
    # Still "running" for a moment after the stop was asked: it is on its way into the pool already.
    if stopped_by_us and status not in ("offline", "unknown"):
        return Phase.COLD
    return None


def expired(
    cold: Sequence[Instance],
    *,
    cold_since: Mapping[int, float],
    now: float,
    max_age_s: float,
    pool_size: int,
    worst_first: Callable[[Instance], float],
) -> list[tuple[Instance, str]]:
    """Cold instances to destroy: those stopped longer than ``max_age_s``, then the worst beyond the pool."""
    out = [(i, "cold_too_old") for i in cold if now - cold_since.get(i.id, now) > max_age_s]
    gone = {i.id for i, _ in out}
    kept = sorted((i for i in cold if i.id not in gone), key=worst_first, reverse=True)
    out += [(i, "cold_pool_full") for i in kept[: max(0, len(kept) - pool_size)]]
    return out


def split_scale_in(
    leaving: Sequence[Instance], *, phases: Mapping[int, Phase], room: int, keep_booting: bool = True
) -> tuple[list[Instance], list[Instance]]:
    """(stop, destroy) for instances leaving, ordered worst first: the best ``room`` running on-demand
    ones are stopped (a bid cannot be resumed at will). With ``keep_booting``, booting ones that still
    fit in the pool are neither: they stay until they run (a disk still being filled is worth nothing
    stopped)."""
    # A resume taken back (`scale --to` only puts resuming ones in ``leaving``) goes back to the pool.
    stoppable = [i for i in leaving if phases.get(i.id) in (Phase.RUNNING, Phase.RESUMING) and not i.is_bid]
    stop = stoppable[max(0, len(stoppable) - room) :] if room > 0 else []
    left = room - len(stop) if keep_booting else 0
    booting = [i for i in leaving if phases.get(i.id) is Phase.BOOTING and not i.is_bid]
    wait = booting[max(0, len(booting) - left) :] if left > 0 else []
    kept = {i.id for i in stop} | {i.id for i in wait}
    return stop, [i for i in leaving if i.id not in kept]


def pool_size(cold_pool: int, cold_mult: float, *, live: int, max_instances: int) -> int:
    """How many stopped instances to keep: ``cold_pool`` at least, else ``cold_mult`` x the live fleet
    (Vast serverless' ``cold_workers`` floor and ``cold_mult``), never more than ``max_instances``
    beyond the floor."""
    return max(cold_pool, min(max_instances, math.ceil(cold_mult * live - 1e-9)))


def pool_ceiling(cold_pool: int, cold_mult: float, *, max_instances: int) -> int:
    """The most the pool may hold at all: what it could grow to with the whole fleet live."""
    return pool_size(cold_pool, cold_mult, live=max_instances, max_instances=max_instances)


def to_fill(pool_size: int, *, cold: int, live: int) -> int:
    """Rents that would fill the pool: its size less what is cold and what is live (every live instance
    goes cold when demand falls). Counting the live ones keeps a resume from triggering a rent."""
    return max(0, pool_size - cold - live)


def pick_resumes(
    cold: Sequence[Instance],
    want: int,
    *,
    budget_usd_per_hour: float,
    avoid: Mapping[int, float],
    best_first: Callable[[Instance], float],
) -> list[Instance]:
    """Up to ``want`` cold instances to resume, best cost per image first, within the $/h left."""
    picked: list[Instance] = []
    budget = budget_usd_per_hour
    for inst in sorted(cold, key=best_first):
        if len(picked) >= want:
            break
        extra = resume_cost(inst)
        if (inst.machine_id is not None and inst.machine_id in avoid) or extra > budget + 1e-9:
            continue
        picked.append(inst)
        budget -= extra
    return picked


def resume_cost(instance: Instance) -> float:
    """What resuming adds to the $/h: the running price less the disk already billed."""
    return max(0.0, instance.dph_total - instance.storage_dph)
