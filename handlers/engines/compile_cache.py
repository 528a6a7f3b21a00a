"""The compiled engine as a portable bundle: what makes a bundle fit this process, and the bytes.

``torch.compiler.save_cache_artifacts()`` collects everything this process compiled (inductor's
FX-graph cache entries with their Triton kernels, AOTAutograd entries); ``load_cache_artifacts()``
puts them back into the local caches, so the warm-up finds every graph already compiled and only
traces. A bundle is valid only for the exact setup that produced it, hence the key: the card and
its compute capability, the torch/triton/diffusers/transformers/torchao versions, the variant and
quantization, the compiled sizes, and a hash of the engine source that shapes the graphs.

With torch's caching precompile on (``use_precompiled_functions``, the worker's default) the bundle
also carries dynamo's own output for each compiled function: its bytecode, guards and the compiled
backend. A hit then neither traces nor calls the compiler: the boot's compile phase on the CPU went
from 18.8 s to 1.8 s (BENCHMARKS.md). ``TORCH_CACHING_PRECOMPILE=0`` (torch's own switch) turns it
off, and bundles then carry the compiled graphs only, as before.

Format: ``MAGIC``, one JSON header line (the key, the artifacts' sha256, the compile time it
saved), then the artifacts. The checksum catches a truncated or damaged file before torch unpickles
it. Storage (folder, S3) is the worker's business: this module only makes and reads bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from klein_facts.variants import TORCHAO_QUANTIZATIONS

logger = logging.getLogger(__name__)

MAGIC = b"KLEIN-COMPILE-BUNDLE 1\n"
# The engine modules whose code decides which graphs get compiled (fusion, truncation, what is
# compiled and how, the tiny architecture). Any edit there makes old bundles miss, never misfit.
ENGINE_SOURCES = (
    "klein.py",
    "speed.py",
    "quantize.py",
    "tiny.py",
    "lora.py",
    "upscaler.py",
    "compile_cache.py",
)
LIBRARIES = ("torch", "triton", "diffusers", "transformers", "torchao", "spandrel")


class BundleError(ValueError):
    """The bytes are not a usable bundle for this process (damaged, or made for another setup)."""


@dataclass(frozen=True)
class LoadedBundle:
    artifacts: int  # cache entries put back into the local caches
    compile_s: float | None  # what the compile cost when the bundle was made


def device_identity(device: torch.device) -> dict[str, str]:
    """The card (name, compute capability), or the CPU's architecture: kernels are built for it."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"device": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}
    return {"device": "cpu", "capability": platform.machine()}


def engine_source_hash() -> str:
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in ENGINE_SOURCES:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    return digest.hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def cache_key(
    *,
    device: torch.device,
    variant: str,
    quantization: str,
    sizes: tuple[tuple[int, int, int], ...],
    attention_backend: str | None = None,
    dynamic: bool = True,
    regions: tuple[str, ...],
    lora_slot: str = "none",
    precompile: bool = False,
) -> dict[str, str]:
    """Everything a compiled graph depends on, as strings (compared field by field on load)."""
    return {
        **device_identity(device),
        **{package: _version(package) for package in LIBRARIES},
        "variant": variant,
        "quantization": quantization,
        "sizes": ",".join(f"{w}x{h}:{b}" for b, w, h in sizes),
        "attention_backend": attention_backend or "default",
        "dynamic": str(dynamic).lower(),  # shape-generic graphs (the worker's) or static ones
        # The LoRA hotswap slot is part of every compiled Linear: MAX_LORAS x LORA_MAX_RANK shapes it.
        "lora_slot": lora_slot,
        "regions": ",".join(regions),  # COMPILE_REGIONS as compiled (klein_facts/compile_regions.py)
        "engine_source": engine_source_hash(),
        # Bundles with dynamo's output (use_precompiled_functions) and without are not interchangeable.
        "precompile": "on" if precompile else "off",
    }


def bundle_name(key: dict[str, str]) -> str:
    """A file/object name: readable variant, then a hash of the whole key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return f"{key['variant']}-{key['quantization']}-{digest}.bundle"


def pack(key: dict[str, str], *, compile_s: float) -> bytes | None:
    """This process's compile artifacts as a bundle; None when nothing was compiled, ``BundleError``
    when torch cannot serialize them."""
    try:
        saved = torch.compiler.save_cache_artifacts()
    except Exception as exc:  # torch pickles what it compiled, dynamo's output included: anything can raise
        raise BundleError(f"torch could not save the compiled engine: {type(exc).__name__}: {exc}") from exc
    if saved is None:
        return None
    artifacts, info = saved
    header = {
        "key": key,
        "sha256": hashlib.sha256(artifacts).hexdigest(),
        "compile_s": round(compile_s, 2),
        "entries": sum(len(v) for v in info.artifacts.values()),
    }
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + artifacts


def read_header(data: bytes) -> tuple[dict[str, Any], bytes]:
    if not data.startswith(MAGIC):
        raise BundleError("not a compile bundle (bad magic)")
    line, sep, artifacts = data[len(MAGIC) :].partition(b"\n")
    if not sep:
        raise BundleError("truncated header")
    try:
        header = json.loads(line)
    except ValueError as exc:
        raise BundleError(f"unreadable header: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("key"), dict):
        raise BundleError("header has no key")
    if hashlib.sha256(artifacts).hexdigest() != header.get("sha256"):
        raise BundleError("checksum mismatch (truncated or damaged)")
    return header, artifacts


def load(data: bytes, key: dict[str, str]) -> LoadedBundle:
    """Put a bundle's artifacts into this process's compile caches, or raise ``BundleError``."""
    header, artifacts = read_header(data)
    different = [
        f"{field} {header['key'].get(field)!r} != {value!r}"
        for field, value in key.items()
        if header["key"].get(field) != value
    ]
    if different:
        raise BundleError("made for another setup: " + "; ".join(different))
    try:
        info = torch.compiler.load_cache_artifacts(artifacts)
    except Exception as exc:  # torch unpickles the payload: a bad one raises anything
        raise BundleError(f"torch could not load it: {type(exc).__name__}: {exc}") from exc
    if info is None:  # torch logs why (a damaged payload) and loads nothing
        raise BundleError("torch could not read the artifacts")
    entries = sum(len(v) for v in info.artifacts.values())
    compile_s = header.get("compile_s")
    return LoadedBundle(entries, float(compile_s) if isinstance(compile_s, int | float) else None)


_DROPPED_GUARD = "is dropped with caching_precompile=True"


class _DroppedGuards(logging.Filter):
    """Drops dynamo's warning for each identity guard it leaves out of a precompiled function."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _DROPPED_GUARD not in str(record.msg)


def precompile_refused(quantization: str) -> str | None:
    """Why an engine quantized with ``quantization`` cannot have dynamo's output in its bundle, or
    None when it can.

    torch 2.14 pickles each tensor a precompiled function guards on as an empty copy on the meta
    device, and torchao's quantized weights (Float8Tensor, Int8Tensor) implement no such copy: the
    first compile fails with "Float8Tensor dispatch: attempting to run unimplemented operator ...
    aten.empty_like", and the boot with it. Leaving those guards out does not help (torch then
    asserts on its own bypass of the package). Such bundles carry inductor's graphs only, as with
    TORCH_CACHING_PRECOMPILE=0: a later boot traces, then compiles nothing.
    """
    if quantization in TORCHAO_QUANTIZATIONS:
        return f"torch cannot serialize the guards on torchao's {quantization} weights"
    return None


def use_precompiled_functions(name: str) -> None:
    """Turn torch's caching precompile on for this process, to load (or make) the bundle ``name``.
    Call before loading the bundle and before anything is compiled.

    With it, ``torch.compile`` looks each function up in dynamo's cache when it wraps it, and a
    compiled function found there runs without being traced; ``save_cache_artifacts`` then packs
    those functions with the graphs. To make a function reusable in another process, dynamo leaves
    out the guards on object identity (modules, functions, the block instance: every instance of a
    block class shares one entry), logging a warning for each: expected here, so filtered out. What
    an identity guard would have caught (other code, other library versions, another variant or
    LoRA slot) the bundle's key already does, and dynamo checks the functions' source itself.

    Dynamo's on-disk cache (``<inductor cache>/dynamo``) files functions by name alone, and would
    take another setup's (another variant, LoRA slot or attention backend, left there by an
    earlier boot) for this one's: it is emptied unless a marker names ``name`` already. Not
    emptied every boot: the workers of one box (one per GPU) share that folder and boot together
    with the same bundle, and one emptying it while another has just filled it would cost that one
    a trace. Dynamo writes each entry atomically, so two workers filling it do not clash.
    """
    import torch._dynamo.config
    from torch._dynamo.package import DynamoCache

    torch._dynamo.config.caching_precompile = True
    guards = logging.getLogger("torch._dynamo.guards")
    if not any(isinstance(f, _DroppedGuards) for f in guards.filters):
        guards.addFilter(_DroppedGuards())

    folder = Path(DynamoCache.path_prefix())
    marker = folder / "klein-bundle"
    if marker.is_file() and marker.read_text() == name:
        return
    DynamoCache.clear()
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(name)


def compile_counts() -> dict[str, int]:
    """Graphs inductor compiled in this process, those it took from a cache (local or bundle), the
    graphs dynamo traced, and the compiled functions taken whole (untraced) from a bundle."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {
        "graphs_compiled": int(inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_bypass"]),
        "graphs_from_cache": int(inductor["fxgraph_cache_hit"]),
        "dynamo_graphs": int(counters["stats"]["unique_graphs"]),
        "precompiled_from_cache": int(counters["dynamo_cache"]["dynamo_cache_hit"]),
    }
