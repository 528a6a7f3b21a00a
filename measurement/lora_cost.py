"""What per-job LoRA adapters cost on the worker's own engine (``scripts/bench_lora.py``): first use, a
cached switch, leaving, per image with one active, and the compiled slot's own cost."""

from __future__ import annotations

import argparse
import gc
import hashlib
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from handlers.engines.klein import KleinEngine
from handlers.engines.klein_loader import build_engine
from handlers.engines.lora import create_lora_adapters
from handlers.lora_files import AdapterFile
from klein_facts.compile_regions import DEFAULT_COMPILE_REGIONS
from measurement.engines import build_pipeline
from measurement.meter import Meter
from measurement.workload import PROMPT

logger = logging.getLogger("bench_lora")


def write_adapter(folder: Path, targets: dict[str, tuple[int, int]], *, rank: int, seed: int) -> AdapterFile:
    """A random adapter on every Linear of the transformer blocks, as the worker would store it."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in sorted(targets.items()):
        if "transformer_blocks." not in name:
            continue
        r = rank * 3 if name.endswith(("to_qkv", "to_added_qkv")) else rank
        tensors[f"transformer.{name}.lora_A.weight"] = (
            torch.randn(r, fan_in, generator=generator) / fan_in**0.5
        )
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(fan_out, r, generator=generator) * 0.01
    path = folder / f"adapter-{seed}.safetensors"
    save_file(tensors, str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return AdapterFile(path=path, sha256=sha, scale=0.8, field="input.loras[0]")


def make_engine(
    args: argparse.Namespace, device: torch.device, *, compiled: bool, max_loras: int
) -> KleinEngine:
    pipeline = build_pipeline(args, device)
    engine = build_engine(
        pipeline, name="bench-lora", device=device, quantization=args.quantization, max_loras=0
    )
    # The order build_engine follows with TORCH_COMPILE on CUDA: adapters (slots), then compile;
    # done here so that --smoke runs the same steps on the CPU with a tracing backend.
    engine.loras = create_lora_adapters(
        pipeline,
        quantization=args.quantization,
        max_loras=max_loras,
        max_rank=args.max_rank,
        hotswap=compiled,
    )
    if compiled:
        engine.compile_at_first_run(DEFAULT_COMPILE_REGIONS, backend=args.compile_backend)
    started = time.perf_counter()
    engine.warm_up()
    logger.info(
        "engine ready (compiled %s, MAX_LORAS %d), warm-up %.1f s",
        compiled,
        max_loras,
        time.perf_counter() - started,
    )
    return engine


def measure_mode(args: argparse.Namespace, device: torch.device, mode: str, folder: Path) -> dict[str, Any]:
    meter = Meter(device)
    compiled = mode == "compiled"
    engine = make_engine(args, device, compiled=compiled, max_loras=2)
    assert engine.loras is not None
    loras = engine.loras

    def generate() -> Any:
        return engine.generate(
            prompts=[PROMPT], seeds=[0], references=[], width=args.size, height=args.size,
            num_steps=args.steps, guidance_scale=1.0,
        )  # fmt: skip

    def enter_leave(file: AdapterFile, *, run: bool = False) -> tuple[float, float, float | None]:
        context = loras.applied([file])
        meter.sync()
        started = time.perf_counter()
        context.__enter__()
        meter.sync()
        entered = time.perf_counter()
        image_s = None
        if run:
            generate()
            meter.sync()
            image_s = time.perf_counter() - entered
        left = time.perf_counter()
        context.__exit__(None, None, None)
        meter.sync()
        return entered - started, time.perf_counter() - left, image_s

    plain, _ = meter.timed(generate, runs=args.runs, warmup=1)
    fresh = [write_adapter(folder, loras.targets, rank=args.rank, seed=100 + i) for i in range(args.adapters)]
    first = [enter_leave(file)[0] for file in fresh]
    switches, leaves, with_lora = [], [], []
    for i in range(max(args.runs, 2)):
        enter_s, leave_s, image_s = enter_leave(fresh[i % 2], run=True)
        switches.append(enter_s)
        leaves.append(leave_s)
        with_lora.append(image_s)
    result: dict[str, Any] = {
        "mode": mode,
        "first_use_s": statistics.median(first),
        "switch_s": statistics.median(switches),
        "leave_s": statistics.median(leaves),
        "s_per_image": statistics.median(plain),
        "s_per_image_lora": statistics.median(s for s in with_lora if s is not None),
        "adapter_mib": fresh[0].path.stat().st_size / 2**20,
    }
    if compiled and args.slot_overhead:
        bare = make_engine(args, device, compiled=True, max_loras=0)
        result["s_per_image_no_slots"] = statistics.median(
            meter.timed(lambda: bare.generate(
                prompts=[PROMPT], seeds=[0], references=[], width=args.size, height=args.size,
                num_steps=args.steps, guidance_scale=1.0,
            ), runs=args.runs, warmup=1)[0]
        )  # fmt: skip
        del bare
        gc.collect()
    logger.info("%s: %s", mode, result)
    return result


def markdown(report: dict[str, Any]) -> str:
    args = report["args"]
    lines = [
        f"{args['model']} {args['quantization']} on {report['env'].get('gpu', report['env']['device'])}, "
        f"{args['size']}x{args['size']}, {args['steps']} steps, adapters of rank {args['rank']} on every "
        f"block layer ({report['modes'][0]['adapter_mib']:.0f} MiB), slots of rank {args['max_rank']}",
        "",
        "| mode | first use (s) | cached switch (s) | leave (s) | s/image none | s/image with adapter "
        "| s/image without slots |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["modes"]:
        no_slots = row.get("s_per_image_no_slots")
        lines.append(
            f"| {row['mode']} | {row['first_use_s']:.3f} | {row['switch_s']:.3f} | {row['leave_s']:.3f} "
            f"| {row['s_per_image']:.3f} | {row['s_per_image_lora']:.3f} "
            f"| {'n/a' if no_slots is None else f'{no_slots:.3f}'} |"
        )
    return "\n".join(lines)
