"""The CLI's fleet-wide options and their plumbing: accepted before a command and after it (after
wins), folded into the settings overrides, and the settings loaded once per invocation.

Typer has no options shared by every command that may also follow the command; this adds them to each
command's signature instead.
"""

from __future__ import annotations

import functools
import inspect
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from provisioning.config import FleetSettings, load_settings

DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the actions; change nothing.")]


# Fleet-wide options, accepted before the command and after it (after wins).
FLEET_OPTIONS: dict[str, Any] = {
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
class Options:
    console: Console
    config: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    _settings: FleetSettings | None = None

    def settings(self) -> FleetSettings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.config, **self.overrides)
            except (ValidationError, ValueError, OSError, tomllib.TOMLDecodeError) as exc:
                fail(self.console, f"configuration: {exc}", code=2)
        return self._settings


def options(ctx: typer.Context) -> Options:
    root = ctx.find_root()
    if root.obj is None:
        root.obj = Options(console=Console())
    opts: Options = root.obj
    return opts


def fleet_options(func: Callable[..., None]) -> Callable[..., None]:
    """Add the fleet-wide options to a command, folding the given ones into the settings overrides."""
    signature = inspect.signature(func, eval_str=True)
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        for name, annotation in FLEET_OPTIONS.items()
    ]

    @functools.wraps(func)
    def wrapper(ctx: typer.Context, **kwargs: Any) -> None:
        opts = options(ctx)
        for name in FLEET_OPTIONS:
            value = kwargs.pop(name)
            if value is not None:
                opts.overrides[name] = value
        func(ctx, **kwargs)

    # Typer reads the signature: present the command's own parameters plus the fleet options.
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), *extra]
    )
    return wrapper


def fail(console: Console, message: str, *, code: int = 1) -> NoReturn:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)
