"""The VRAM benchmark's markdown table: the seed-table layout of shared/reference/flux2-klein.md, one
column for the profile just measured."""

from __future__ import annotations

from klein_facts.profile import BenchmarkProfile, size_key
from klein_facts.variants import GIB


def markdown_table(profile: BenchmarkProfile) -> str:
    steps = profile.settings.steps
    rows = [("card", profile.gpu.name if profile.gpu else "CPU")]
    run = profile.settings
    compiled = f"yes, {run.compile_warmup_s:.1f} s of warm-up" if run.compile_warmup_s else "yes"
    rows.append(("torch.compile", compiled if run.compiled else "no (eager)"))
    if profile.rest_vram:
        rows.append(
            ("VRAM at rest", _gib(profile.rest_vram.torch_allocated_bytes, profile.rest_vram.nvml_used_bytes))
        )
    for size in profile.resolutions:
        key = size_key(size.width, size.height)
        rows.append(
            (f"peak VRAM {key}", "OOM" if size.oom else _gib(size.peak_torch_bytes, size.peak_nvml_bytes))
        )
        latency = "OOM" if size.oom else f"{size.latency_s_median:.3f} s"
        rows.append((f"inference {key}, {steps} steps", latency))
    limits = profile.limits
    if limits.bytes_per_reference is not None:
        rows.append(("VRAM per reference image", f"{limits.bytes_per_reference / 2**20:.0f} MiB"))
    if limits.seconds_per_reference is not None:
        rows.append(("time per extra reference", f"{limits.seconds_per_reference:.3f} s"))
    for key, value in limits.max_references.items():
        note = " (estimated)" if key in limits.max_references_estimated else ""
        rows.append((f"max references {key}", f"{value}{note}"))
    rows.append(("max batch", str(limits.max_batch)))
    for up in profile.upscaler:
        what = up.error or f"{up.latency_s:.3f} s"
        if up.peak_torch_bytes is not None:
            what += f", peak {up.peak_torch_bytes / GIB:.2f} GiB with klein resident"
        rows.append((f"upscale x{up.scale} {up.input} -> {up.input * up.scale}", what))
    rec = profile.recommendation
    rows.append(("fits", f"{'yes' if rec.fits else 'no'}: {rec.reason}"))
    header = f"| | {profile.variant.label} |\n|---|---|\n"
    return header + "\n".join(f"| {name} | {value} |" for name, value in rows)


def _gib(torch_bytes: int | None, nvml_bytes: int | None) -> str:
    if torch_bytes is None and nvml_bytes is None:
        return "n/a (CPU)"
    parts = [f"{torch_bytes / GIB:.2f} GiB torch" if torch_bytes is not None else ""]
    parts.append(f"{nvml_bytes / GIB:.2f} GiB NVML" if nvml_bytes is not None else "")
    return ", ".join(p for p in parts if p)
