"""`python -m provisioning`: offers, status, scale, autoscale, destroy, simulate.

Fleet-wide options (``--fleet``, ``--max``...) go before or after the command; every command that changes
anything takes ``--dry-run``, which prints the actions and changes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from provisioning import compose, render
from provisioning.autoscale import TICK_ERRORS, Tick, destroy_fleet
from provisioning.config import FleetSettings, load_settings, masked_env
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
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the actions; change nothing.")]


# Fleet-wide options, accepted before the command and after it (after wins).
_FLEET_OPTIONS: dict[str, Any] = {
    "fleet": Annotated[str | None, typer.Option(help="Fleet name: the Vast instance label.")],
    "queue_url": Annotated[str | None, typer.Option(help="SQS job queue URL (or QUEUE_URL).")],
    "image": Annotated[str | None, typer.Option(help="Worker image (ghcr.io/OWNER/klein-worker:TAG).")],
    "min_instances": Annotated[int | None, typer.Option("--min", help="Fewest instances.")],
    "max_instances": Annotated[int | None, typer.Option("--max", help="Most instances.")],
    "target_wait_s": Annotated[
        float | None, typer.Option("--target-wait", help="Target queue wait, seconds.")
    ],
    "max_hourly_usd": Annotated[float | None, typer.Option(help="Cap on the fleet's $/h.")],
    "cold_pool": Annotated[
        int | None, typer.Option(help="Stopped instances kept to resume instead of renting (0: none).")
    ],
    "cold_mult": Annotated[
        float | None, typer.Option(help="Or this many stopped per live instance, when more (0: off).")
    ],
    "max_price_per_gpu_hour": Annotated[
        float | None, typer.Option(help="Skip offers above this $/GPU-hour.")
    ],
    "interruptible": Annotated[
        bool | None, typer.Option("--interruptible/--on-demand", help="Bid for interruptible instances.")
    ],
}


@dataclass
class _Options:
    console: Console
    config: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    _settings: FleetSettings | None = None

    def settings(self) -> FleetSettings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.config, **self.overrides)
            except (ValidationError, ValueError, OSError, tomllib.TOMLDecodeError) as exc:
                _fail(self.console, f"configuration: {exc}", code=2)
        return self._settings


def _options(ctx: typer.Context) -> _Options:
    root = ctx.find_root()
    if root.obj is None:
        root.obj = _Options(console=Console())
    opts: _Options = root.obj
    return opts


def _fleet_options(func: Callable[..., None]) -> Callable[..., None]:
    """Add the fleet-wide options to a command, folding the given ones into the settings overrides."""
    signature = inspect.signature(func, eval_str=True)
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        for name, annotation in _FLEET_OPTIONS.items()
    ]

    @functools.wraps(func)
    def wrapper(ctx: typer.Context, **kwargs: Any) -> None:
        opts = _options(ctx)
        for name in _FLEET_OPTIONS:
            value = kwargs.pop(name)
            if value is not None:
                opts.overrides[name] = value
        func(ctx, **kwargs)

    # Typer reads the signature: present the command's own parameters plus the fleet options.
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), *extra]
    )
    return wrapper


def _fail(console: Console, message: str, *, code: int = 1) -> NoReturn:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@app.callback()
@_fleet_options
def main(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO (one line per action), WARNING.")] = "WARNING",
) -> None:
    # force: the CLI owns the process's logging, whatever a host process configured before.
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    if log_level.upper() != "DEBUG":
        # boto3/botocore chat at INFO (credential lookups); only the fleet's own actions are worth a line.
        for noisy in ("botocore", "boto3", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    _options(ctx).config = config


@app.command()
@_fleet_options
def offers(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 20,
) -> None:
    """Matching offers, ranked by estimated cost per image (price / throughput)."""
    opts = _options(ctx)
    s = opts.settings()
    try:
        requirements = s.requirements()
        found = compose.vast_client(s, need_key=False).search_offers(requirements.to_query())
    except (ValueError, *TICK_ERRORS) as exc:
        _fail(opts.console, str(exc))
    ranked = rank_offers(found, requirements=requirements, throughput=s.throughput())
    opts.console.print(render.offers_table(ranked, limit=limit))
    opts.console.print(
        "img/s from a benchmark profile where one covers the GPU, else an estimate from DLPerf."
    )


@app.command()
@_fleet_options
def status(ctx: typer.Context) -> None:
    """Backlog, fleet by state with $/h, and the size the policy wants now and why."""
    opts = _options(ctx)
    try:
        obs, decision = compose.autoscaler(opts.settings(), apply=False).plan()
    except (ValueError, *TICK_ERRORS) as exc:
        _fail(opts.console, str(exc))
    current = obs.samples[-1] if obs.samples else None
    opts.console.print(render.backlog_table(current, target_wait_s=opts.settings().target_wait_s))
    opts.console.print(render.fleet_table(obs.instances, decision, now=obs.now))
    opts.console.print(render.phase_totals(obs.instances, decision.phases))
    for line in render.decision_lines(decision):
        opts.console.print(line)


def _print_tick(opts: _Options, tick: Tick, *, dry_run: bool) -> None:
    opts.console.print(f"{time.strftime('%H:%M:%S')} {render.tick_summary(tick)}")
    for line in render.decision_lines(tick.decision, for_status=False):
        opts.console.print(f"  {line}")
    if tick.report.actions:
        opts.console.print(render.actions_table(tick.report.actions, dry_run=dry_run))


def _print_launch(opts: _Options) -> None:
    s = opts.settings()
    spec = s.launch_spec()
    note = f"interruptible bid (min_bid +{s.offers.bid_margin:.0%})" if s.interruptible else "on-demand"
    opts.console.print(render.launch_table(spec, masked_env(spec.env), price_note=note))


@app.command()
@_fleet_options
def scale(
    ctx: typer.Context,
    to: Annotated[int, typer.Option("--to", min=0, help="Instances wanted.")],
    dry_run: DryRun = False,
) -> None:
    """Rent or destroy until the fleet has N instances (scale-in drains workers with SIGTERM)."""
    opts = _options(ctx)
    try:
        scaler = compose.autoscaler(opts.settings(), manual_size=to, persist=not dry_run)
        tick = scaler.tick(dry_run=dry_run)
    except (ValueError, *TICK_ERRORS) as exc:
        _fail(opts.console, str(exc))
    _print_tick(opts, tick, dry_run=dry_run)
    if dry_run and tick.decision.rents:
        _print_launch(opts)


@app.command()
@_fleet_options
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
    opts = _options(ctx)
    s = opts.settings()
    try:
        scaler = compose.autoscaler(s, persist=not dry_run)
    except ValueError as exc:
        _fail(opts.console, str(exc), code=2)
    if retry_image:
        scaler.retry_image()
    if dry_run:
        _print_launch(opts)
    if once:
        try:
            tick = scaler.tick(dry_run=dry_run)
        except TICK_ERRORS as exc:
            _fail(opts.console, str(exc))
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
        _fail(opts.console, f"Vast refused the API key: {exc}")


@app.command()
@_fleet_options
def destroy(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="Every instance of the fleet.")] = False,
    include_unknown: Annotated[
        bool, typer.Option(help="Also labelled instances running another image.")
    ] = False,
    dry_run: DryRun = False,
) -> None:
    """Destroy the fleet's instances (their workers drain on SIGTERM)."""
    opts = _options(ctx)
    if not all_:
        _fail(opts.console, "say --all to destroy the whole fleet", code=2)
    s = opts.settings()
    try:
        vast = compose.vast_client(s)
    except ValueError as exc:
        _fail(opts.console, str(exc), code=2)
    try:
        actions = destroy_fleet(
            vast, label=s.fleet, image=s.image, include_unknown=include_unknown, dry_run=dry_run
        )
    except (ValueError, *TICK_ERRORS) as exc:
        _fail(opts.console, str(exc))
    opts.console.print(render.actions_table(actions, dry_run=dry_run))
    if not actions:
        opts.console.print(f"no instances labelled {s.fleet!r}")


@app.command()
@_fleet_options
def simulate(
    ctx: typer.Context,
    trace: Annotated[str, typer.Option(help=f"CSV of arrival timestamps, or one of: {', '.join(PATTERNS)}.")],
    duration: Annotated[float, typer.Option(help="Seconds of a built-in pattern.")] = 4 * 3600.0,
    seed: Annotated[int, typer.Option(help="Seed for built-in arrivals, boots and prices.")] = 0,
    interval: Annotated[float, typer.Option(help="Autoscale tick, seconds.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Replay arrivals against the policy and a static fleet of the same cost (modelled GPUs and boots)."""
    opts = _options(ctx)
    s = opts.settings()
    try:
        arrivals = load_trace(trace, duration_s=duration, seed=seed)
        requirements = s.requirements()
    except (OSError, ValueError) as exc:
        _fail(opts.console, str(exc), code=2)
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
