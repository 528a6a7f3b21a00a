"""Boot cost of reading klein's weights from a cold disk, with and without the read ahead that
starts before torch is imported (``worker/prefetch.py``).

    python scripts/bench_boot_read.py --model klein-4b --dir /var/tmp/klein-4b --runs 3
    python scripts/bench_boot_read.py --smoke --dir /tmp/klein-smoke --runs 1   # checks the script

Writes the full-size folder with constant bf16 weights once (``measurement/weights_folder.py``;
klein-4B: 16 GB, on a real disk, not tmpfs), then alternates fresh processes without and with the
read ahead (``measurement/boot_read.py``), each after dropping the folder's files from the page
cache: process start to every parameter read once, split into imports, ``load_pipeline`` and the
read. Prints JSON, then a markdown table of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from measurement.environment import environment
from measurement.page_cache import evict, read_ahead_kb
from measurement.random_weights import TRANSFORMER_CONFIGS
from measurement.weights_folder import SMOKE, write_klein_folder

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("process_s", "imports_s", "load_s", "read_params_s", "total_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(TRANSFORMER_CONFIGS), default="klein-4b")
    parser.add_argument("--smoke", action="store_true", help="the tiny pipeline: checks the script")
    parser.add_argument("--dir", type=Path, required=True, help="where the folder is written")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def one_boot(folder: Path, prefetch: bool) -> dict[str, Any]:
    for path in folder.rglob("*.safetensors"):
        if not evict(path):
            raise RuntimeError(f"the page cache kept {path} (tmpfs?): no cold read possible")
    command = [
        sys.executable,
        "-m",
        "measurement.boot_read",
        str(folder),
        *(["--prefetch"] if prefetch else []),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env=env).stdout
    return {"process_s": round(time.perf_counter() - started, 2), **json.loads(out.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = write_klein_folder(SMOKE if args.smoke else args.model, args.dir)
    runs = [one_boot(folder, prefetch) for _ in range(args.runs) for prefetch in (False, True)]
    medians = {
        mode: {
            key: statistics.median(run[key] for run in runs if run["prefetch"] == (mode == "read ahead"))
            for key in KEYS
        }
        for mode in ("no read ahead", "read ahead")
    }
    report = {
        "model": SMOKE if args.smoke else args.model,
        "environment": environment(torch.device("cpu")),
        "read_ahead_kb": read_ahead_kb(folder),
        "weights_gb": round(sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 1e9, 2),
        "runs": runs,
        "medians": medians,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print("\n| boot | process start -> weights read | imports | load_pipeline | read params |")
    print("|---|---|---|---|---|")
    for mode, row in medians.items():
        print(
            f"| {mode} | {row['process_s']:.2f} s | {row['imports_s']:.2f} s | {row['load_s']:.2f} s | "
            f"{row['read_params_s']:.2f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
