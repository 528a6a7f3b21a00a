"""Rich tables for the CLI. Rendering only: every figure comes from the caller."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

from rich.table import Table

from provisioning.autoscale import Tick
from provisioning.models import Instance, QueueSample
from provisioning.offers import RankedOffer
from provisioning.policy import Decision
from provisioning.reconcile import Action
from provisioning.simulate import SimResult, StaticFleet
from provisioning.vast import LaunchSpec


def offers_table(ranked: Sequence[RankedOffer], *, limit: int) -> Table:
    table = Table(
        title=f"Offers by estimated cost per image (best {min(limit, len(ranked))} of {len(ranked)})"
    )
    for column in (
        "#",
        "offer",
        "GPU",
        "VRAM GB",
        "$/h",
        "$/GPU-h",
        "img/s",
        "source",
        "$/1k img",
        "reliab.",
        "host",
        "where",
    ):
        table.add_column(column, justify="left" if column in ("GPU", "source", "where") else "right")
    for rank, item in enumerate(ranked[:limit], start=1):
        o = item.offer
        table.add_row(
            str(rank),
            str(o.id),
            f"{o.num_gpus}x {o.gpu_name}",
            f"{o.gpu_ram_mb / 1024:.0f}",
            f"{item.price:.3f}",
            f"{item.price / o.num_gpus:.3f}",
            f"{item.estimate.images_per_second:.2f}",
            item.estimate.source,
            f"{item.cost_per_1k_images:.3f}",
            f"{o.reliability:.3f}",
            str(o.host_id),
            o.geolocation,
        )
    return table


def backlog_table(sample: QueueSample | None, *, target_wait_s: float | None = None) -> Table:
    """One row per queue, highest priority first (and a total when there are several)."""
    table = Table(title="Backlog")
    table.add_column("queue")
    for column in ("visible", "in flight", "delayed", "target wait"):
        table.add_column(column, justify="right")
    if sample is None:
        table.add_row("-", "-", "-", "-", "-")
        return table
    fleet_wait = f"{target_wait_s:.0f}s" if target_wait_s else "-"
    for q in sample.queues:
        wait = f"{q.target_wait_s:.0f}s" if q.target_wait_s else fleet_wait
        table.add_row(q.name, str(q.visible), str(q.in_flight), str(q.delayed), wait)
    if len(sample.queues) != 1:
        total = "total" if sample.queues else "queue"
        table.add_row(total, str(sample.visible), str(sample.in_flight), str(sample.delayed), fleet_wait)
    return table


def fleet_table(instances: Sequence[Instance], decision: Decision, *, now: float) -> Table:
    table = Table(title="Fleet")
    for column in ("instance", "GPU", "phase", "vast status", "age", "$/h", "machine", "host"):
        table.add_column(column, justify="right" if column in ("age", "$/h") else "left")
    for inst in instances:
        phase = decision.phases.get(inst.id)
        table.add_row(
            str(inst.id),
            f"{inst.num_gpus}x {inst.gpu_name}",
            str(phase) if phase else "UNKNOWN (not ours)",
            inst.actual_status or "provisioning",
            _age(now - inst.started_at) if inst.started_at is not None else "not started",
            f"{inst.hourly_cost:.3f}",
            str(inst.machine_id),
            str(inst.host_id),
        )
    return table


def phase_totals(instances: Sequence[Instance], phases: Mapping[int, object]) -> Table:
    counts: dict[str, int] = defaultdict(int)
    dollars: dict[str, float] = defaultdict(float)
    for inst in instances:
        key = str(phases.get(inst.id, "unknown (not ours)"))
        counts[key] += 1
        dollars[key] += inst.hourly_cost  # a cold instance bills its disk alone
    table = Table(title="Fleet by state")
    table.add_column("state")
    table.add_column("instances", justify="right")
    table.add_column("$/h", justify="right")
    for key in sorted(counts):
        table.add_row(key, str(counts[key]), f"{dollars[key]:.3f}")
    table.add_row("total", str(len(instances)), f"{sum(dollars.values()):.3f}")
    return table


def actions_table(actions: Sequence[Action], *, dry_run: bool) -> Table:
    table = Table(title="Planned actions (dry run: nothing changed)" if dry_run else "Actions")
    for column in ("action", "target", "why", "outcome"):
        table.add_column(column)
    for a in actions:
        table.add_row(a.kind, a.target, a.reason, a.outcome)
    return table


def launch_table(spec: LaunchSpec, masked: Mapping[str, str], *, price_note: str) -> Table:
    table = Table(title="Each rent would launch", show_header=False)
    table.add_column("field")
    table.add_column("value")
    table.add_row("image", spec.image)
    table.add_row("label", spec.label)
    table.add_row("runtype", spec.runtype)
    table.add_row("disk", f"{spec.disk_gb:g} GB")
    table.add_row("price", price_note)
    table.add_row("image_login", "*** (set)" if spec.image_login else "none (public image)")
    table.add_row("env", ", ".join(f"{k}={v}" for k, v in sorted(masked.items())))
    return table


def simulation_table(results: Sequence[SimResult]) -> Table:
    table = Table(title="Simulation")
    table.add_column("metric")
    for r in results:
        table.add_column(r.name, justify="right")
    rows: list[tuple[str, Callable[[SimResult], str]]] = [
        ("jobs (unserved at end)", lambda r: f"{r.jobs} ({r.unserved})"),
        ("GPU-hours", lambda r: f"{r.gpu_hours:.2f}"),
        ("cost $", lambda r: f"{r.cost_usd:.2f}"),
        ("wait p50 s", lambda r: f"{r.wait_p50_s:.1f}"),
        ("wait p95 s", lambda r: f"{r.wait_p95_s:.1f}"),
        ("wait max s", lambda r: f"{r.wait_max_s:.1f}"),
        ("max backlog", lambda r: str(r.max_backlog)),
        ("rents / destroys", lambda r: f"{r.rents} / {r.destroys}"),
        ("peak $/h", lambda r: f"{r.peak_hourly_usd:.2f}"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(r) for r in results))
    return table


def simulation_json(
    trace: str, jobs: int, results: list[dict[str, object]], equal: StaticFleet
) -> dict[str, object]:
    """`simulate --json`: the runs, and the cheapest static fleet reaching the policy's p95 wait."""
    return {
        "trace": trace,
        "jobs": jobs,
        "results": results,
        "static_equal_p95": {
            "cost_usd": round(equal.result.cost_usd, 4),
            "wait_p95_s": round(equal.result.wait_p95_s, 3),
            "size": equal.size,
            "gpu": equal.gpu,
        },
    }


def decision_lines(decision: Decision, *, for_status: bool = True) -> list[str]:
    """Notes and strangers; for `status` also the desired size and why, and what a tick would do now."""
    lines = [f"note: {note}" for note in decision.notes]
    lines += [
        f"[yellow]unknown instance {i.id} carries the fleet label but runs {i.image!r}[/yellow]"
        for i in decision.unknown
    ]
    if for_status:
        head = f"Desired size: [bold]{decision.desired}[/bold] (capacity now {decision.capacity}): "
        head += decision.reason
        steps = [f"rent {r.offer.id} ({r.offer.gpu_name}, ${r.price:.3f}/h)" for r in decision.rents]
        steps += [f"destroy {d.instance.id} ({d.reason})" for d in decision.destroys]
        steps += [f"stop {i.id} into the cold pool" for i in decision.stops]
        steps += [f"resume {i.id}" for i in decision.resumes]
        lines = [head, *lines, f"autoscale would now: {'; '.join(steps) or 'nothing'}"]
    return lines


def tick_summary(tick: Tick) -> str:
    d = tick.decision
    sample = tick.observation.samples[-1] if tick.observation.samples else None
    backlog = f"visible {sample.visible}, in flight {sample.in_flight}" if sample else "no queue"
    return (
        f"{backlog}; capacity {d.capacity} -> desired {d.desired}; "
        f"${d.hourly_now:.2f}/h -> ${tick.report.hourly_after:.2f}/h"
    )


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
