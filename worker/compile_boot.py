"""Boot's compile step: look the engine's bundle up, compile (or load), save after a miss, warm up.

The order (issue 10): weights are loaded but nothing is compiled yet, and the compile wrappers are
not in place either (the engine's first run puts them there); the bundle for this exact setup is
fetched from COMPILE_CACHE and loaded into torch's caches; the warm-up then compiles the served
sizes, finding every compiled function (dynamo's output with its graphs:
``compile_cache.use_precompiled_functions``) in the cache on a hit; after a miss (or a bundle that
lacked graphs) the new bundle is saved to every store. A missing, damaged or mismatched bundle is
one warning and a normal compile.

Each phase's seconds land in ``phases`` for the ``ready`` log line and /healthz.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from worker.compile_store import BundleStore, FolderStore, fetch, publish

if TYPE_CHECKING:
    from handlers.engines.klein import KleinEngine
    from handlers.engines.upscaler import Upscaler

log = logging.getLogger(__name__)

# What a first compile costs, for the log line before it (BENCHMARKS.md): 4B BF16 on an H100 170 s;
# the tiny model with inductor's C++ backend on a 2-core CPU ~80 s. Keyed by "on CUDA".
FIRST_COMPILE_ESTIMATE_S = {True: 170, False: 80}


def _sizes_text(sizes: tuple[tuple[int, int, int], ...]) -> str:
    return ", ".join(f"{w}x{h} batch {b}" for b, w, h in sizes)


def warm_up(
    engine: KleinEngine,
    *,
    variant: str,
    quantization: str,
    stores: list[BundleStore],
    phases: dict[str, Any],
    dynamic: bool = True,
    upscaler: Upscaler | None = None,
    precompile: bool = True,
) -> None:
    """Warm ``engine`` (and a compiled ``upscaler``) up, through the compile cache when anything is
    compiled; fills ``phases``. ``dynamic``: how klein's regions were compiled (the worker:
    shape-generic), part of the key. ``precompile`` (TORCH_CACHING_PRECOMPILE): bundles carry
    dynamo's output too (``compile_cache.use_precompiled_functions``), part of the key."""
    upscaler = upscaler if upscaler is not None and upscaler.compiled else None
    if not engine.compiled and upscaler is None:
        started = time.perf_counter()
        engine.warm_up()
        phases.update(compile_cache="not compiled", warm_up_s=round(time.perf_counter() - started, 2))
        return
    import torch

    from handlers.engines import compile_cache

    regions = compiled_regions(engine, upscaler)
    refused = compile_cache.precompile_refused(quantization)
    if precompile and stores and refused:
        log.info("compile cache: the bundle holds inductor's graphs only: %s", refused)
    precompile = precompile and bool(stores) and not refused
    key = compile_cache.cache_key(
        device=engine.device,
        variant=variant,
        quantization=quantization,
        sizes=engine.compile_sizes,
        attention_backend=engine.attention_backend,
        dynamic=dynamic,
        lora_slot=lora_slot(engine),
        regions=regions,
        precompile=precompile,
    )
    name = compile_cache.bundle_name(key)
    if precompile:  # before the first run wraps any region: torch looks functions up as it wraps them
        compile_cache.use_precompiled_functions(name)
    started = time.perf_counter()
    found = fetch(stores, name)
    loaded = None
    if found.data is not None:
        try:
            loaded = compile_cache.load(found.data, key)
        except compile_cache.BundleError as exc:
            log.warning("compile cache: %s from %s ignored (%s); compiling instead", name, found.source, exc)
    phases["cache_load_s"] = round(time.perf_counter() - started, 2)
    state = f"hit from {found.source}" if loaded else ("off" if not stores else "miss")
    if loaded and loaded.compile_s:
        estimate = f"~{loaded.compile_s:.0f} s when it was compiled, far less from the cache"
    else:
        estimate = f"~{FIRST_COMPILE_ESTIMATE_S[engine.device.type == 'cuda']} s"
    sizes = _sizes_text(engine.compile_sizes)
    log.info(
        "compiling %s (%s) for %s, cache %s, %s", engine.name, ", ".join(regions), sizes, state, estimate
    )

    started = time.perf_counter()
    # The first passes compile (or load from the cache). The upscaler goes first: klein's warm-up
    # ends by setting dynamo's stance to eager_on_recompile, which would turn the upscaler's first
    # compile into eager runs (under that stance dynamo compiles no new function at all: torch 2.14).
    if upscaler is not None:
        phases["upscaler_scales"] = upscaler.warm_up()
    engine.warm_up()
    torch.compiler.set_stance("eager_on_recompile")  # also when klein itself is not compiled
    compile_s = time.perf_counter() - started
    counts = compile_cache.compile_counts()
    log.info(
        "compiled in %.1f s: %d graphs compiled, %d from the cache, %d traced, %d functions loaded whole",
        compile_s,
        counts["graphs_compiled"],
        counts["graphs_from_cache"],
        counts["dynamo_graphs"],
        counts["precompiled_from_cache"],
    )
    if precompile and loaded and counts["dynamo_graphs"]:
        # A hit that still traced: the bundle's precompiled functions did not all load (dynamo
        # logs why). The boot paid the tracing a hit should skip; worth an operator's look.
        log.warning(
            "compile cache: %s hit, but %d graphs were traced: its precompiled functions did not load",
            name,
            counts["dynamo_graphs"],
        )
    phases.update(compile_cache="hit" if loaded else state, compile_s=round(compile_s, 2), **counts)
    if stores and (loaded is None or counts["graphs_compiled"]):
        save(stores, name, key, compile_s=compile_s, phases=phases)

    started = time.perf_counter()
    # A second pass: kernel selection and allocator warm, nothing left to compile.
    if upscaler is not None:
        upscaler.warm_up()
    engine.warm_up()
    phases["warm_up_s"] = round(time.perf_counter() - started, 2)


def compiled_regions(engine: KleinEngine, upscaler: Upscaler | None) -> tuple[str, ...]:
    """The COMPILE_REGIONS really compiled: klein's (none for an engine that is not compiled, e.g.
    nunchaku's own transformer) and, given a compiled ``upscaler``, the upscaler's."""
    regions = tuple(engine.compile_regions) if engine.compiled else ()
    return regions + (("upscaler",) if upscaler is not None else ())


def save(
    stores: list[BundleStore], name: str, key: dict[str, str], *, compile_s: float, phases: dict[str, Any]
) -> None:
    from handlers.engines import compile_cache

    started = time.perf_counter()
    try:
        data = compile_cache.pack(key, compile_s=compile_s)
    except compile_cache.BundleError as exc:  # the engine is compiled and serves; only later boots pay
        log.warning("compile cache: %s; no bundle saved", exc)
        return
    if data is None:
        log.warning("compile cache: torch returned no artifacts to save")
        return
    written = publish(stores, name, data)
    phases["cache_save_s"] = round(time.perf_counter() - started, 2)
    if written:
        log.info("compile cache: %s (%.1f MiB) saved to %s", name, len(data) / 2**20, ", ".join(written))


def use_inductor_cache_dir(stores: list[BundleStore]) -> None:
    """Keep inductor's own caches (on a CPU the built C++ libraries, on CUDA Triton's) in the
    first local folder's ``inductor/``, on the instance disk: a restart of the same machine then
    skips even the C++/PTX builds a bundle cannot carry. Called before torch is imported (torch
    fills in its default the first time it looks), and only when TORCHINDUCTOR_CACHE_DIR is unset
    (the image sets its own): inductor takes its cache folder from the environment only."""
    for store in stores:
        if isinstance(store, FolderStore):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(store.root / "inductor")
            return


def lora_slot(engine: KleinEngine) -> str:
    """The hotswap slot compiled into the transformer (``MAX_LORAS`` x ``LORA_MAX_RANK``), or none."""
    loras = engine.loras
    if loras is None or not loras.hotswap or loras.unsupported:
        return "none"
    return f"{loras.max_loras}x{loras.max_rank}"
