"""What a benchmark ran on: package versions, the card (NVML, else torch), and the identity sections
of a benchmark profile (software, variant, run settings)."""

from __future__ import annotations

import argparse
import platform
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import torch

from klein_facts.profile import GpuSection, RunSettings, SoftwareSection, VariantSection


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Python, the ML packages and the card, for the speed benchmarks' JSON reports."""
    env: dict[str, Any] = {"python": platform.python_version(), "device": str(device)}
    for package in ("torch", "diffusers", "transformers", "torchao", "spandrel"):
        env[package] = package_version(package)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def gpu_section(device: torch.device, *, visible_devices: str | None = None) -> GpuSection | None:
    """The card ``device`` is on, from NVML where it answers (``visible_devices``: the worker's
    CUDA_VISIBLE_DEVICES, which maps torch's index to NVML's); None on a CPU."""
    if device.type != "cuda":
        return None
    from worker.gpu import probe_gpus

    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    probed = probe_gpus(visible_devices)
    nvml = probed[index] if index < len(probed) else None
    return GpuSection(
        name=nvml.name if nvml else props.name,
        total_bytes=nvml.total_bytes if nvml else int(props.total_memory),
        driver=nvml.driver if nvml else None,
        cuda=nvml.cuda if nvml else torch.version.cuda,
        compute_capability=(props.major, props.minor),
    )


def profile_identity(
    args: argparse.Namespace,
    device: torch.device,
    gpu: GpuSection | None,
    *,
    compiled: bool = False,
    compile_warmup_s: float | None = None,
) -> dict[str, Any]:
    """The profile's sections that say what was measured where: created_at, gpu, software,
    variant and settings."""
    from worker.boot import Variant

    variant = Variant(args.model, args.quantization, device.type, "benchmark")
    return {
        "created_at": datetime.now(UTC),
        "gpu": gpu,
        "software": SoftwareSection(
            python=platform.python_version(),
            torch=torch.__version__,
            diffusers=package_version("diffusers") or "?",
            transformers=package_version("transformers"),
            torchao=package_version("torchao"),
            torch_cuda=torch.version.cuda,
        ),
        "variant": VariantSection(
            model=args.model,
            quantization=args.quantization,
            label=variant.label,
            device=str(device),
            random_weights=bool(args.random_weights and args.model != "tiny"),
        ),
        "settings": RunSettings(
            steps=args.steps,
            runs=args.runs,
            reference_side=args.ref_side,
            compiled=compiled,
            compile_warmup_s=compile_warmup_s,
        ),
    }
