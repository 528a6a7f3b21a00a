"""One boot's weight read, in a fresh process: ``python -m measurement.boot_read FOLDER [--prefetch]``.

The order is the worker's (``worker.boot.build_engines``): the read ahead starts (``--prefetch``),
then torch, diffusers and transformers are imported, then ``load_pipeline`` maps the folder, then
every parameter is read once, as ``pipeline.to("cuda")`` reads it. Prints one JSON line of phases.
Nothing above ``main`` imports torch: that is the point of starting first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from worker.prefetch import start_prefetch


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prefetch", action="store_true")
    args = parser.parse_args(argv)
    prefetch = start_prefetch(args.folder) if args.prefetch else None

    import torch

    from handlers.engines.klein_loader import load_pipeline

    imported = time.perf_counter()
    pipeline = load_pipeline(str(args.folder), torch_dtype=torch.bfloat16)
    loaded = time.perf_counter()
    for name in ("transformer", "vae", "text_encoder"):
        for parameter in getattr(pipeline, name).parameters():
            parameter.clone()
    done = time.perf_counter()
    phases = {
        "imports_s": round(imported - started, 2),
        "load_s": round(loaded - imported, 2),
        "read_params_s": round(done - loaded, 2),
        "total_s": round(done - started, 2),
        "prefetch": args.prefetch,
        **(prefetch.report() if prefetch is not None else {}),
    }
    sys.stdout.write(json.dumps(phases) + "\n")  # the result, read by the parent; not a log line


if __name__ == "__main__":
    main()
