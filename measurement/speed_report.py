"""The speed benchmark's report (``scripts/bench_gpu.py``): saved as JSON while it grows, and printed
as markdown tables at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from klein_facts.compile_regions import KLEIN_COMPILE_REGIONS

# The reference compute floor for klein-4B at 1024x1024, 4 steps, on an H100 (flux2-klein.md).
H100_FLOOR_S = 0.2


def save_partial(report: dict[str, Any], path: Path | None) -> None:
    """Write what is measured so far: a run cut off by a time limit still leaves its stages."""
    if path:
        path.write_text(json.dumps(report, indent=2) + "\n")


def markdown(report: dict[str, Any]) -> str:
    args = report["args"]
    lines = [
        f"{args['model']} on {report['env'].get('gpu', report['env']['device'])}, "
        f"{args['size']}x{args['size']}, {args['steps']} steps (random weights)",
        "",
        f"| stage | s/image (median of {args['runs']}) | images/s (batch {args['batch']}) "
        "| VRAM at rest (GiB) | peak single / batch (GiB) |",
        "|---|---|---|---|---|",
    ]
    for stage in report["stages"]:
        lines.append(
            f"| {stage['stage']} | {stage['s_per_image']:.3f} | {stage['images_per_s']:.2f} "
            f"| {_gib(stage['rest']['allocated_gib'])} "
            f"| {_gib(stage['peak_gib_single'])} / {_gib(stage['peak_gib_batch'])} |"
        )
    lines += [
        "",
        "| stage | text encoder | denoise | VAE decode | post | total (s, median) |",
        "|---|---|---|---|---|---|",
    ]
    for stage in report["stages"]:
        parts = stage["stages_s"]
        lines.append(
            f"| {stage['stage']} | {parts['text_encoder']:.3f} | {parts['denoise']:.3f} "
            f"| {parts['vae_decode']:.3f} | {parts['post']:.3f} | {parts['total']:.3f} |"
        )
    lines += _compile_lines(report)
    if args["model"] == "klein-4b" and report["stages"]:
        best = min(stage["s_per_image"] for stage in report["stages"])
        lines.append(f"Best vs the H100 floor ({H100_FLOOR_S} s): {best / H100_FLOOR_S:.2f}x")
    if report.get("profile"):
        lines += _profile_lines(report["profile"])
    if report.get("upscale_x4"):
        lines += [
            "",
            "| Real-ESRGAN x4 | load or compile (s) | upscale (s) | peak (GiB) |",
            "|---|---|---|---|",
        ]
        for row in report["upscale_x4"]:
            label = f"{row['input']}->{row['output']} " + (
                f"tiled {row['tile']}" if row["tile"] else "untiled"
            )
            if row.get("compiled"):
                label += f" compiled ({row['graphs_compiled_during_runs']} graphs compiled in the runs)"
                boot = f"{row['compile_s']:.1f} compile"
            else:
                boot = f"{row['load_s']:.2f}"
            lines.append(f"| {label} | {boot} | {row['s']:.3f} | {_gib(row['peak_gib'])} |")
    return "\n".join(lines)


def _profile_lines(found: dict[str, Any]) -> list[str]:
    idle = found["device_idle_ms"]
    lines = [
        "",
        f"Profiled image: {found['wall_ms']:.1f} ms, GPU busy {found['device_busy_ms']:.1f} ms"
        + (f", idle {idle:.1f} ms" if idle is not None else "")
        + "; host waits: "
        + (", ".join(f"{op} x{n}" for op, n in found["syncs"].items() if n) or "none"),
        "",
        "| host op | calls | self host (ms) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {row['op']} | {row['calls']} | {row['self_host_ms']:.2f} |" for row in found["top_host_ops"]
    ]
    return lines


def _compile_lines(report: dict[str, Any]) -> list[str]:
    if "compile_boot" in report:
        boot = report["compile_boot"]
        return [
            f"\nBoot cost of compiling: {report['compile_warmup_s']:.1f} s "
            f"(compile cache {boot['compile_cache']}: {boot.get('graphs_compiled')} graphs compiled, "
            f"{boot.get('graphs_from_cache')} from the cache)"
        ]
    if "compile_warmup_s" in report:
        parts = ", ".join(
            f"{region} {report[f'compile_warmup_{region}_s']:.1f} s"
            for region in KLEIN_COMPILE_REGIONS
            if f"compile_warmup_{region}_s" in report
        )
        return [
            f"\nBoot cost of compiling (warm-up of the compiled engine): {report['compile_warmup_s']:.1f} s"
            f" ({parts})"
        ]
    return []


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
