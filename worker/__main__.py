"""`python -m worker [run|demo|enqueue]`: composition only."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker.config import Settings
from worker.logs import configure_logging

app = typer.Typer(add_completion=False, help="FLUX.2-klein queue worker.", no_args_is_help=False)
console = Console()


@app.callback(invoke_without_command=True)
def _default(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        run()


@app.command()
def run() -> None:
    """Boot (GPU probe, model choice, preload) and poll the queue until SIGTERM."""
    from worker.app import serve
    from worker.boot_error import BootError

    settings = _settings()
    try:
        serve(settings)
    except BootError as exc:
        # A card that fits nothing, no GPU, a bad profile: one clear line, not a traceback.
        _cannot_start(str(exc), transient=exc.transient)


@app.command("fetch-weights")
def fetch_weights() -> None:
    """Download the upscaler checkpoints (UPSCALER_WEIGHTS_X2/_X4) into the cache and exit.

    The Dockerfile runs it with BAKE_UPSCALER_WEIGHTS=true, so the image starts with them."""
    from worker.boot import fetch_upscaler_weights, upscaler_for
    from worker.boot_error import BootError
    from worker.variant import Variant

    settings = _settings()
    try:
        fetch_upscaler_weights(upscaler_for(settings, Variant("klein-4b", "none", "cpu", "fetch-weights")))
    except BootError as exc:
        _cannot_start(str(exc), transient=exc.transient)


def _settings(*, configure: bool = True, **overrides: Any) -> Settings:
    """Settings from the environment; a bad value is one line naming the variable, exit 3.
    ``configure``: set up logging from them (the demo does it once its own defaults apply)."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        configure_logging(level="INFO", fmt="json")
        _cannot_start(settings_error(exc))
    if configure:
        configure_logging(level=settings.log_level, fmt=settings.log_format)
    return settings


def settings_error(exc: ValidationError) -> str:
    """``MODEL=klein-5b: Input should be 'auto', ...`` for each bad variable, on one line."""
    parts = []
    for error in exc.errors():
        name = "_".join(str(part) for part in error["loc"]).upper() or "settings"
        value = error.get("input")
        shown = f"{name}={value}" if isinstance(value, str | int | float) else name
        parts.append(f"{shown}: {error['msg']}")
    return "; ".join(parts)


def _cannot_start(message: str, *, transient: bool = False) -> NoReturn:
    """Exit 3: cannot serve, the container ends (docker/entrypoint.sh) and the fleet replaces it.
    A transient cause exits 1 instead: the entrypoint restarts the worker with backoff."""
    if transient:
        logging.getLogger("worker").error("cannot start yet: %s; exiting to be restarted", message)
        raise typer.Exit(code=1)
    logging.getLogger("worker").error("cannot start: %s", message)
    raise typer.Exit(code=3)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the images are saved.")] = Path("outputs"),
) -> None:
    """Run the whole loop locally: embedded SQS + S3, sample jobs, the tiny model on CPU."""
    from worker.app import boot_engines, build_runner
    from worker.demo import DEMO_SIZE, REAL_SIZE, default_model, demo_adapter, run_demo
    from worker.gpu import probe_gpus
    from worker.local import start_local_stack

    stack = start_local_stack(high_priority=True)
    try:
        # The worker's boto3 client takes the stack's endpoint and credentials from the environment;
        # the stack's queues replace any the shell names (QUEUE_URL and QUEUE_URLS together are an error).
        os.environ.pop("QUEUE_URL", None)
        os.environ.update(stack.env())
        settings = _settings(configure=False, wait_time_seconds=1)
        # The demo's own defaults; anything set explicitly still wins (e.g. MODEL on a GPU box).
        defaults: dict[str, Any] = {"log_format": "text", "log_level": "WARNING"}
        if "model" not in settings.model_fields_set:
            gpus = probe_gpus(settings.cuda_visible_devices)
            defaults["model"] = default_model(gpu_found=bool(gpus), model_path=settings.model_path)
        unset = {k: v for k, v in defaults.items() if k not in settings.model_fields_set}
        settings = settings.model_copy(update=unset)
        configure_logging(level=settings.log_level, fmt=settings.log_format)
        with console.status(f"loading {settings.model} model..."):
            engines, limits = boot_engines(settings)

        def run_worker(n_jobs: int) -> int:
            with _progress() as progress:
                task = progress.add_task("jobs", total=n_jobs)

                def on_event(status: str, fields: dict[str, Any]) -> None:
                    progress.console.log(f"{fields.get('id')}: {status}")
                    if status != "retry":
                        progress.advance(task)

                runner = build_runner(settings, engines=engines, on_event=on_event, limits=limits)
                return runner.run(burst=True)

        size = DEMO_SIZE if settings.model == "tiny" else REAL_SIZE
        loras = engines.klein.loras if engines.klein is not None else None
        adapter = demo_adapter(loras.targets) if loras is not None and not loras.unsupported else None
        results, saved = run_demo(stack=stack, run_worker=run_worker, out_dir=out, size=size, adapter=adapter)
    finally:
        stack.stop()
    _print_results(results, saved)
    if len(results) < 4:
        raise typer.Exit(code=1)


@app.command()
def enqueue(
    file: Annotated[
        Path, typer.Argument(help="Job JSON (one object or a list).", exists=True, dir_okay=False)
    ],
    presign: Annotated[bool, typer.Option(help="Turn s3://bucket/key URLs into presigned URLs.")] = False,
    expires: Annotated[int, typer.Option(help="Presigned URL lifetime, seconds.")] = 3600,
) -> None:
    """Push job(s) onto QUEUE_URL."""
    from worker.enqueue import enqueue_jobs

    settings = _settings()
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        console.print(f"[red]{file}: not a readable JSON file ({exc})[/red]")
        raise typer.Exit(code=2) from None
    jobs = data if isinstance(data, list) else [data]
    for job_id, message_id in enqueue_jobs(settings, jobs, presign=presign, expires=expires):
        console.print(f"enqueued {job_id} as message {message_id}")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _print_results(results: list[dict[str, Any]], saved: list[Path]) -> None:
    table = Table(title="results")
    for column in ("id", "queue", "status", "model", "detail"):
        table.add_column(column)
    for result in results:
        output = result.get("output") or {}
        if result.get("error"):
            detail = f"{result['error']['code']}: {result['error']['message']}"
        elif "results" in output:
            detail = ", ".join(f"{r['width']}x{r['height']}" for r in output["results"] if r["success"])
        else:
            detail = f"{output.get('output_width')}x{output.get('output_height')}"
        queue = (result.get("queue") or "-").rsplit("/", 1)[-1]
        table.add_row(result["id"], queue, result["status"], result["model"], detail)
    console.print(table)
    console.print_json(json.dumps(results))
    console.print(f"{len(saved)} image(s) saved: " + ", ".join(str(p) for p in saved))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
