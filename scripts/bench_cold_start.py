"""Cold start: container start to the first finished job, measured on a real ``python -m worker`` process.

A job is queued first (moto SQS + S3 on loopback, as in the demo), then the worker process starts;
the clock runs from the spawn to the job's result on the result queue. The worker's own ``ready``
log line splits that into boot (imports, GPU probe, weight load, warm-up/compile) and the first
job. Repeated ``--runs`` times, each a fresh process; medians reported.

    python scripts/bench_cold_start.py                                # tiny model, CPU
    python scripts/bench_cold_start.py --save-tiny /tmp/klein-tiny    # tiny weights loaded from disk
    python scripts/bench_cold_start.py --model klein-4b --model-path /models/klein-4b --size 1024
    python scripts/bench_cold_start.py --model klein-4b --model-path ... --env TORCH_COMPILE=false
    python scripts/bench_cold_start.py --env TORCH_COMPILE=true --env COMPILE_CACHE=/tmp/cc --runs 2 \
        --env COMPILE_SIZES=256x256 --size 256     # run 1 compiles and saves, run 2 loads the bundle

``--bundle-only-runs K`` empties the COMPILE_CACHE folders but for their bundles before each of the
last K runs: those are new containers that got the bundle from S3; the runs before them are
restarted instances, with inductor's and dynamo's own caches still on their disk.

``--drop-page-cache`` evicts MODEL_PATH's weight files before each run, so the boot reads them from
disk (a restarted instance) rather than from the memory a just-written folder still sits in.

With ``--save-tiny DIR`` the tiny pipeline is written with ``save_pretrained`` and the worker loads
it as ``MODEL=klein-4b MODEL_PATH=DIR``: the disk-loading path a real deployment takes. On a GPU,
``--save-random klein-4b --save-dir DIR`` writes the full-size architecture with random weights
(``measurement/random_weights.py``, ~16 GB for 4B) the same way: a true cold start from local disk
without downloading the gated weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from klein_facts.variants import KLEIN_MODELS
from measurement.cold_start import keep_only_bundles, one_run
from measurement.page_cache import drop_folder
from worker.local import start_local_stack

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="MODEL for the worker (default tiny)")
    parser.add_argument("--model-path", help="MODEL_PATH: a local diffusers folder")
    parser.add_argument("--save-tiny", type=Path, help="write the tiny pipeline here and load it from disk")
    parser.add_argument("--save-random", choices=KLEIN_MODELS, help="write this full-size random model (GPU)")
    parser.add_argument("--save-dir", type=Path, help="where --save-random writes (and the worker loads)")
    parser.add_argument("--size", type=int, default=512, help="the first job's square size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for one result")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the worker")
    parser.add_argument(
        "--drop-page-cache",
        action="store_true",
        help="evict MODEL_PATH's weight files before each run: read from disk, not from memory",
    )
    parser.add_argument(
        "--bundle-only-runs",
        type=int,
        default=0,
        help="the last K runs find only the bundles in the COMPILE_CACHE folders: new containers",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, model_path = args.model, args.model_path
    if args.save_tiny:
        from handlers.engines.tiny import build_tiny_pipeline

        build_tiny_pipeline().save_pretrained(args.save_tiny)
        model, model_path = "klein-4b", str(args.save_tiny)
    elif args.save_random:
        if args.save_dir is None:
            raise SystemExit("--save-random needs --save-dir")
        from measurement.random_weights import build_random_pipeline

        build_random_pipeline(args.save_random, device="cuda").save_pretrained(args.save_dir)
        model, model_path = args.save_random, str(args.save_dir)
    stack = start_local_stack(bucket="cold-start", queue="cold-start")
    try:
        env = {**os.environ, **stack.env(), "MODEL": model, "LOG_FORMAT": "json", "WAIT_TIME_SECONDS": "1"}
        if model_path:
            env["MODEL_PATH"] = model_path
        if args.save_tiny:
            env.setdefault("DEVICE", "cpu")
            # The tiny folder is the offline CPU check of the loading path: no Real-ESRGAN download.
            env.setdefault("UPSCALER_WEIGHTS_X2", "")
            env.setdefault("UPSCALER_WEIGHTS_X4", "")
        env.update(item.split("=", 1) for item in args.env)
        runs = []
        for index in range(args.runs):
            # A folder just written (--save-*) sits in the page cache: a boot would read memory.
            dropped = bool(args.drop_page_cache and model_path and drop_folder(Path(model_path)))
            new_container = index >= max(1, args.runs - args.bundle_only_runs)  # run 1 makes the bundle
            bundles = keep_only_bundles(env.get("COMPILE_CACHE", "")) if new_container else None
            run = one_run(stack, env, args.size, index, args.timeout, cwd=ROOT)
            runs.append({**run, "cold_disk": dropped, "bundles_only": bundles})
    finally:
        stack.stop()
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "runs": runs,
        "median": {
            key: statistics.median(run[key] for run in runs)
            for key in ("to_ready_s", "to_first_result_s", "first_job_s")
        },
    }
    print(json.dumps(report, indent=2))
    median = report["median"]
    print(
        f"\n| {runs[0]['model']} | start -> ready {median['to_ready_s']:.1f} s "
        f"| first job {median['first_job_s']:.1f} s "
        f"| start -> first result {median['to_first_result_s']:.1f} s |"
    )
    for index, run in enumerate(runs):
        boot = run["boot"]
        print(
            f"| run {index + 1} | start -> first result {run['to_first_result_s']:.1f} s "
            f"| cold disk {run['cold_disk']} | imports {boot.get('imports_s', 0):.1f} s "
            f"| weights {boot.get('weights_s', 0):.1f} s (read ahead {boot.get('prefetch_gb', 0)} GB) "
            f"| compile cache {boot.get('compile_cache', '-')} | compile {boot.get('compile_s', 0):.1f} s "
            f"| graphs compiled {boot.get('graphs_compiled', '-')} "
            f"| from cache {boot.get('graphs_from_cache', '-')} | traced {boot.get('dynamo_graphs', '-')} "
            f"| precompiled from cache {boot.get('precompiled_from_cache', '-')} "
            f"| bundle only {run['bundles_only'] is not None} |"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
