"""`python -m provisioning`: offers, status, scale, autoscale, destroy, simulate.

Fleet-wide options (``--fleet``, ``--max``...) go before or after the command; every command that changes
anything takes ``--dry-run``, which prints the actions and changes nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from provisioning import compose, render
from provisioning.autoscale import TICK_ERRORS, Tick, destroy_fleet
from provisioning.cliopts import DryRun, Options, fail, fleet_options, options
from provisioning.launch_env import masked_env
from provisioning.offers import rank_offers
from provisioning.simulate import SimConfig, cheapest_static, compare
from provisioning.traces import PATTERNS, load_trace
from provisioning.vast import VastAuthError

app = typer.Typer(
    help="Rent and destroy Vast.ai instances running the klein-worker image so the fleet follows the queue.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class LogLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


@app.callback()
@fleet_options
def main(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")] = None,
    # A choice, so a typo is a usage error naming the option, not a ValueError traceback.
    log_level: Annotated[
        LogLevel, typer.Option(help="DEBUG, INFO (one line per action), WARNING.", case_sensitive=False)
    ] = LogLevel.WARNING,
) -> None:
    level = log_level.value
    # force: the CLI owns the process's logging, whatever a host process configured before.
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if level != "DEBUG":
        # boto3/botocore chat at INFO (credential lookups); only the fleet's own actions are worth a line.
        for noisy in ("botocore", "boto3", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    options(ctx).config = config


@app.command()
@fleet_options
def offers(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 20,
) -> None:
    """Matching offers, ranked by estimated cost per image (price / throughput)."""
    opts = options(ctx)
    s = opts.settings()
    try:
        requirements = s.requirements()
        found = compose.vast_client(s, need_key=False).search_offers(requirements.to_query())
    except (ValueError, *TICK_ERRORS) as exc:
        fail(opts.console, str(exc))
    ranked = rank_offers(found, requirements=requirements, throughput=s.throughput())
    opts.console.print(render.offers_table(ranked, limit=limit))
    opts.console.print(
        "img/s from a benchmark profile where one covers the GPU, else an estimate from DLPerf."
    )


@app.command()
@fleet_options
def status(ctx: typer.Context) -> None:
    """Backlog, fleet by state with $/h, and the size the policy wants now and why."""
    opts = options(ctx)
    try:
        obs, decision = compose.autoscaler(opts.settings(), apply=False).plan()
    except (ValueError, *TICK_ERRORS) as exc:
        fail(opts.console, str(exc))
    current = obs.samples[-1] if obs.samples else None
    opts.console.print(render.backlog_table(current, target_wait_s=opts.settings().target_wait_s))
    opts.console.print(render.fleet_table(obs.instances, decision, now=obs.now))
    opts.console.print(render.phase_totals(obs.instances, decision.phases))
    for line in render.decision_lines(decision):
        opts.console.print(line)


def _print_tick(opts: Options, tick: Tick, *, dry_run: bool) -> None:
    opts.console.print(f"{time.strftime('%H:%M:%S')} {render.tick_summary(tick)}")
    for line in render.decision_lines(tick.decision, for_status=False):
        opts.console.print(f"  {line}")
    if tick.report.actions:
        opts.console.print(render.actions_table(tick.report.actions, dry_run=dry_run))


def _print_launch(opts: Options) -> None:
    s = opts.settings()
    spec = s.launch_spec()
    note = f"interruptible bid (min_bid +{s.offers.bid_margin:.0%})" if s.interruptible else "on-demand"
    opts.console.print(render.launch_table(spec, masked_env(spec.env), price_note=note))


@app.command()
@fleet_options
def scale(
    ctx: typer.Context,
    to: Annotated[int, typer.Option("--to", min=0, help="Instances wanted.")],
    dry_run: DryRun = False,
) -> None:
    """Rent or destroy until the fleet has N instances (scale-in drains workers with SIGTERM)."""
    opts = options(ctx)
    try:
        scaler = compose.autoscaler(opts.settings(), manual_size=to, persist=not dry_run)
        tick = scaler.tick(dry_run=dry_run)
    except (ValueError, *TICK_ERRORS) as exc:
        fail(opts.console, str(exc))
    _print_tick(opts, tick, dry_run=dry_run)
    if dry_run and tick.decision.rents:
        _print_launch(opts)


@app.command()
@fleet_options
def autoscale(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="One tick, then exit (for cron).")] = False,
    interval: Annotated[float | None, typer.Option(help="Seconds between ticks.")] = None,
    dry_run: DryRun = False,
    retry_image: Annotated[
        bool, typer.Option("--retry-image", help="Rent again after an unpullable image was fixed.")
    ] = False,
) -> None:
    """Follow the queue: sample, decide, rent/destroy; forever, or once."""
    opts = options(ctx)
    s = opts.settings()
    try:
        scaler = compose.autoscaler(s, persist=not dry_run)
    except ValueError as exc:
        fail(opts.console, str(exc), code=2)
    if retry_image:
        scaler.retry_image()
    if dry_run:
        _print_launch(opts)
    if once:
        try:
            tick = scaler.tick(dry_run=dry_run)
        except TICK_ERRORS as exc:
            fail(opts.console, str(exc))
        _print_tick(opts, tick, dry_run=dry_run)
        return
    try:
        scaler.run(
            interval_s=interval or s.interval_s,
            dry_run=dry_run,
            on_tick=lambda t: _print_tick(opts, t, dry_run=dry_run),
        )
    except KeyboardInterrupt:
        opts.console.print("stopped; instances keep running (use `destroy --all` to end the fleet)")
    except VastAuthError as exc:
        fail(opts.console, f"Vast refused the API key: {exc}")


@app.command()
@fleet_options
def destroy(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="Every instance of the fleet.")] = False,
    include_unknown: Annotated[
        bool, typer.Option(help="Also labelled instances running another image.")
    ] = False,
    dry_run: DryRun = False,
) -> None:
    """Destroy the fleet's instances (their workers drain on SIGTERM)."""
    opts = options(ctx)
    if not all_:
        fail(opts.console, "say --all to destroy the whole fleet", code=2)
    s = opts.settings()
    try:
        vast = compose.vast_client(s)
    except ValueError as exc:
        fail(opts.console, str(exc), code=2)
    try:
        actions = destroy_fleet(
            vast, label=s.fleet, image=s.image, include_unknown=include_unknown, dry_run=dry_run
        )
    except (ValueError, *TICK_ERRORS) as exc:
        fail(opts.console, str(exc))
    opts.console.print(render.actions_table(actions, dry_run=dry_run))
    if not actions:
        opts.console.print(f"no instances labelled {s.fleet!r}")


@app.command()
@fleet_options
def simulate(
    ctx: typer.Context,
    trace: Annotated[str, typer.Option(help=f"CSV of arrival timestamps, or one of: {', '.join(PATTERNS)}.")],
    duration: Annotated[float, typer.Option(help="Seconds of a built-in pattern.")] = 4 * 3600.0,
    seed: Annotated[int, typer.Option(help="Seed for built-in arrivals, boots and prices.")] = 0,
    interval: Annotated[float, typer.Option(help="Autoscale tick, seconds.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Replay arrivals against the policy and a static fleet of the same cost (modelled GPUs and boots)."""
    opts = options(ctx)
    s = opts.settings()
    try:
        arrivals = load_trace(trace, duration_s=duration, seed=seed)
        requirements = s.requirements()
    except (OSError, ValueError) as exc:
        fail(opts.console, str(exc), code=2)
    sim = SimConfig(tick_s=interval, seed=seed, images_per_job=s.policy.images_per_job)
    policy_result, static_result = compare(
        arrivals,
        policy=dataclasses.replace(s.policy_config(), image="sim"),
        requirements=requirements,
        sim=sim,
    )
    equal = cheapest_static(arrivals, wait_p95_s=policy_result.wait_p95_s, sim=sim)
    if as_json:
        rows = [dataclasses.asdict(r) for r in (policy_result, static_result)]
        for row in rows:
            row.pop("fleet_sizes")
        typer.echo(json.dumps(render.simulation_json(trace, len(arrivals), rows, equal), indent=2))
        return
    span = arrivals[-1] if arrivals else 0.0
    opts.console.print(f"trace {trace}: {len(arrivals)} jobs over {span / 3600:.2f} h; tick {interval:g}s")
    opts.console.print(render.simulation_table([policy_result, static_result, equal.result]))
    opts.console.print(
        f"{equal.result.name}: the cheapest static fleet whose p95 wait is at most the policy's."
    )
    opts.console.print("GPU prices, throughputs and boot times are modelled (provisioning/catalog.py).")
