"""Cost of per-job LoRA adapters on a GPU: first use, a cached switch, per image with one active.

    python scripts/bench_lora.py --model klein-4b                   # eager and compiled, BF16
    python scripts/bench_lora.py --model klein-4b --mode compiled --slot-overhead
    python scripts/bench_lora.py --smoke                            # same code, tiny model, CPU

Builds the full-size architecture with random weights (as ``bench_gpu.py`` does) and two random
adapters of ``--rank`` on every Linear layer of the transformer blocks, written to local files
(download time excluded: it is a network figure, not a GPU one). Per mode (``eager``:
diffusers' load/set_adapters; ``compiled``: the hotswap slot for adapters of ``--max-rank``
compiled in), on the worker's own engine and ``LoraAdapters``:

- ``first_use_s``: entering a job's adapter context for an adapter never seen (parse, check,
  load or swap in), median over fresh adapters;
- ``switch_s``: entering it for an adapter already parsed (and, eager, loaded), alternating two;
- ``leave_s``: leaving it (disable, or zeroing the slot);
- ``s_per_image`` without an adapter and ``s_per_image_lora`` with one active (median of --runs);
- with ``--slot-overhead`` (compiled only, one more compile): ``s_per_image_no_slots`` on an engine
  built with ``MAX_LORAS=0``, the cost every job pays for the slot.
Prints JSON, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from measurement.environment import environment
from measurement.lora_cost import markdown, measure_mode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("klein-4b", "klein-9b"), default="klein-4b")
    parser.add_argument("--quantization", choices=("none", "fp8", "int8"), default="none")
    parser.add_argument("--mode", choices=("eager", "compiled", "both"), default="both")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16, help="adapter rank per layer (x3 on fused q/k/v)")
    parser.add_argument("--max-rank", type=int, default=64, help="LORA_MAX_RANK of the compiled slot")
    parser.add_argument("--adapters", type=int, default=3, help="fresh adapters for the first-use median")
    parser.add_argument("--slot-overhead", action="store_true", help="compiled: also time MAX_LORAS=0")
    parser.add_argument("--compile-backend", default="inductor", help="'eager' traces only (for --smoke)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.size, args.steps, args.runs, args.rank, args.max_rank = "tiny", 256, 1, 1, 2, 4
        args.compile_backend = "eager"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    modes = ("eager", "compiled") if args.mode == "both" else (args.mode,)
    report: dict[str, Any] = {"env": environment(device), "args": {**vars(args), "json": str(args.json)}}
    report["modes"] = []
    with tempfile.TemporaryDirectory() as folder:
        for mode in modes:
            report["modes"].append(measure_mode(args, device, mode, Path(folder)))
            if args.json:
                args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
