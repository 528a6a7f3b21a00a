"""Boot cost of reading klein's text encoder: whole (as diffusers loads it, then cut) or read cut.

    python scripts/bench_text_encoder_read.py --model klein-4b --dir /var/tmp/te-4b --runs 3
    python scripts/bench_text_encoder_read.py --model klein-9b --dir /var/tmp/te-9b

Writes the full-size text encoder with constant bf16 weights under ``--dir`` once (Qwen3-4B:
8.0 GB; Qwen3-8B: 16.4 GB; on a real disk, not tmpfs), then alternates the two modes ``--runs``
times, each from a cold page cache (``measurement/text_encoder_read.py``). Prints JSON, then a
markdown table of medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from measurement.environment import environment
from measurement.page_cache import read_ahead_kb
from measurement.random_weights import TEXT_ENCODER_CONFIGS
from measurement.text_encoder_read import MODES, measure
from measurement.weights_folder import SMOKE, write_klein_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(TEXT_ENCODER_CONFIGS), default="klein-4b")
    parser.add_argument("--smoke", action="store_true", help="a small 36-layer encoder: checks the script")
    parser.add_argument("--dir", type=Path, required=True, help="where the text encoder is written")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    transformers_logging.disable_progress_bar()
    folder = write_klein_folder(SMOKE if args.smoke else args.model, args.dir, weights=("text_encoder",))
    runs = [measure(folder, mode) for _ in range(args.runs) for mode in MODES]
    medians = {
        mode: {
            key: statistics.median(run[key] for run in runs if run["mode"] == mode)
            for key in ("load_s", "read_params_s", "total_s", "read_bytes", "files_bytes", "layers_kept")
        }
        for mode in MODES
    }
    report = {
        "model": SMOKE if args.smoke else args.model,
        "environment": environment(torch.device("cpu")),
        "read_ahead_kb": read_ahead_kb(folder),
        "runs": runs,
        "medians": medians,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"\nread-ahead {report['read_ahead_kb']} KB")
    print("| mode | layers kept | load s | read params s | total s | GB read of GB |")
    print("|---|---|---|---|---|---|")
    for mode, row in medians.items():
        print(
            f"| {mode} | {row['layers_kept']} | {row['load_s']:.2f} | {row['read_params_s']:.2f} | "
            f"{row['total_s']:.2f} | {row['read_bytes'] / 1e9:.2f} of {row['files_bytes'] / 1e9:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
