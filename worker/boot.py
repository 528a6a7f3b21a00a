"""Boot: build the engines for the chosen variant (worker/variant.py), load and warm up.

Every failure here is a ``BootError`` saying what to fix: a bad MODEL_PATH, weights that will not
load, a quantization backend this build or card lacks, a bad COMPILE_CACHE.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from handlers.engine_set import Engines
from klein_facts.compile_regions import klein_regions
from klein_facts.variants import GIB, HUB_IDS
from worker.boot_error import BootError
from worker.compile_store import BundleStore, open_stores
from worker.config import Settings
from worker.prefetch import start_prefetch
from worker.variant import Variant

if TYPE_CHECKING:
    from handlers.engines.upscaler import Upscaler

log = logging.getLogger(__name__)


# What diffusers/huggingface_hub/safetensors raise for weights that are missing, partial, corrupt,
# gated or unreachable: OSError covers the hub's HTTP and offline errors, ValueError and
# safetensors' own error a folder whose files do not match its configs.
WEIGHT_LOAD_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, SafetensorError)


def build_engines(settings: Settings, variant: Variant) -> Engines:
    """Create the engines. With PRELOAD_MODELS (the default) klein loads and runs its warm-up
    here, before the first job; without, the first generate job loads it. The upscaler loads on
    demand, except a compiled one (COMPILE_REGIONS naming it, with PRELOAD_MODELS), which loads
    and compiles with klein."""
    started = time.perf_counter()
    hf_home = Path(settings.hf_home) if settings.hf_home else Path.home() / ".cache" / "huggingface"
    regions = settings.regions_to_compile(variant.device)
    stores = compile_stores(settings, hf_home) if regions else []  # before torch: see compile_stores
    # Before torch too: the disk reads the weights while the imports below run.
    prefetch = None
    if settings.preload_models:
        skip = ("transformer",) if settings.nunchaku_transformer_path else ()
        prefetch = start_prefetch(weights_folder(settings, variant, hf_home), skip=skip)
    from handlers.engines.klein import KleinEngine
    from handlers.engines.klein_loader import create_klein_engine
    from handlers.engines.quantize import UnsupportedQuantization, check_quantization, device_capability
    from handlers.engines.speed import UnknownAttentionBackend
    from handlers.lora_files import LoraFiles
    from worker import compile_boot

    phases: dict[str, Any] = {"imports_s": round(time.perf_counter() - started, 2)}

    def load_klein() -> KleinEngine:
        loading = time.perf_counter()
        library_output_to_logs()
        try:
            engine = create_klein_engine(
                model=variant.model,
                model_path=settings.model_path,
                quantization=variant.quantization,
                device=variant.device,
                hf_token=settings.hf_token.get_secret_value() if settings.hf_token else None,
                cache_dir=str(hf_home / "hub"),  # where huggingface_hub keeps snapshots under HF_HOME
                compile=bool(klein_regions(regions)),
                compile_regions=klein_regions(regions),
                nunchaku_transformer=settings.nunchaku_transformer_path,
                max_loras=settings.max_loras,
                lora_max_rank=settings.lora_max_rank,
                compile_sizes=settings.compile_shapes(),
                attention_backend=settings.attention_backend,
            )
        except WEIGHT_LOAD_ERRORS as exc:
            raise BootError(weights_error(settings, variant, exc)) from exc
        phases["weights_s"] = round(time.perf_counter() - loading, 2)
        if prefetch is not None:
            phases.update(prefetch.report())
        if upscaler.compiled:  # its warm-up, next, loads the checkpoints: a bad URL is a boot error here
            fetch_upscaler_weights(upscaler)
        compile_boot.warm_up(
            engine,
            variant=variant.label,
            quantization=variant.quantization,
            stores=stores,
            phases=phases,
            upscaler=upscaler,
            precompile=settings.torch_caching_precompile,
        )
        log.info("%s loaded in %.1f s", engine.name, time.perf_counter() - loading)
        return engine

    check_model_path(settings)
    # The upscaler is compiled only when it loads at boot, in klein's compile window (and bundle):
    # compiled on first use it would stall that job, or run eager after klein's warm-up.
    compile_upscaler = "upscaler" in regions and settings.preload_models
    upscaler = upscaler_for(settings, variant, compile_backend="inductor" if compile_upscaler else None)
    lora_files = None
    if settings.max_loras:
        lora_files = LoraFiles(
            directory=hf_home / "klein-worker" / "loras",
            budget_bytes=int(settings.lora_cache_gb * GIB),
            max_file_bytes=settings.max_lora_bytes,
        )
    try:
        if settings.preload_models:
            engines = Engines(
                klein=load_klein(), upscaler=upscaler, label=variant.label, lora_files=lora_files, boot=phases
            )
            fetch_upscaler_weights(upscaler)
        else:
            # Loading waits for the first generate job; a missing backend is still a boot error.
            check_quantization(
                variant.quantization,
                capability=device_capability(variant.device),
                nunchaku_transformer=settings.nunchaku_transformer_path,
            )
            engines = Engines(
                klein=None,
                upscaler=upscaler,
                load_klein=load_klein,
                label=variant.label,
                lora_files=lora_files,
                boot=phases,
            )
    except (UnsupportedQuantization, UnknownAttentionBackend) as exc:
        raise BootError(f"{variant.label}: {exc}") from exc
    load_s = time.perf_counter() - started
    log.info(
        "ready: %s on %s in %.1f s (%s)%s; phases %s",
        variant.label,
        variant.device,
        load_s,
        variant.reason,
        "" if settings.preload_models else "; PRELOAD_MODELS=false: loads on the first generate job",
        phases,
        extra={
            "job": {
                "event": "ready",
                "model": variant.label,
                "load_s": round(load_s, 2),
                "preloaded": settings.preload_models,
                "boot": phases,
            }
        },
    )
    return engines


def library_output_to_logs() -> None:
    """Nothing between the worker's log lines: no download or loading bars (huggingface_hub also
    honours HF_HUB_DISABLE_PROGRESS_BARS, set in the image; diffusers and transformers only their
    own switches), and their warnings go through our handler instead of their own stderr one."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    hub_output_to_logs()
    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.disable_default_handler()
        library.enable_propagation()


def hub_output_to_logs() -> None:
    """huggingface_hub's part of ``library_output_to_logs``, without importing torch. Its logger has
    a stderr handler of its own and propagates as well, so each of its warnings (an offline boot's
    "Could not reach the Hub ... Using cached commit hash") came out twice, once as a bare line.
    Unlike diffusers and transformers it has no switch for that handler: removed here."""
    import huggingface_hub.utils

    huggingface_hub.utils.disable_progress_bars()
    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        hub_logger.removeHandler(handler)
    hub_logger.propagate = True


def check_model_path(settings: Settings) -> None:
    """MODEL_PATH must be a diffusers folder (``save_pretrained`` layout); checked before any load,
    also with PRELOAD_MODELS=false, so a typo is a boot error and not the first job's."""
    if not settings.model_path or settings.model == "tiny":
        return
    folder = Path(settings.model_path)
    if not folder.is_dir():
        raise BootError(f"MODEL_PATH={folder} is not a folder; point it at a diffusers klein folder")
    if not (folder / "model_index.json").is_file():
        raise BootError(
            f"MODEL_PATH={folder} has no model_index.json: not a diffusers folder (save_pretrained "
            "layout, e.g. `hf download black-forest-labs/FLUX.2-klein-4B --local-dir ...`)"
        )


def weights_error(settings: Settings, variant: Variant, exc: Exception) -> str:
    """One line for weights that would not load, saying what to fix."""
    detail = " ".join(str(exc).split())[:300] or type(exc).__name__
    if settings.model_path:
        return (
            f"{variant.label}: the weights in MODEL_PATH={settings.model_path} could not be loaded "
            f"({detail}); a partial or corrupt folder: download it again or point MODEL_PATH at a "
            "complete copy"
        )
    hub_id = HUB_IDS.get(variant.model, variant.model)
    token = "check that HF_TOKEN belongs to" if settings.hf_token else "set HF_TOKEN to a token of"
    return (
        f"{variant.label}: {hub_id} could not be loaded ({detail}). The weights are gated: {token} "
        f"an account that accepted the license at https://huggingface.co/{hub_id}, or set MODEL_PATH "
        "to a downloaded folder"
    )


def upscaler_for(settings: Settings, variant: Variant, *, compile_backend: str | None = None) -> Upscaler:
    from handlers.engines.upscaler_loader import create_upscaler

    hf_home = Path(settings.hf_home) if settings.hf_home else Path.home() / ".cache" / "huggingface"
    try:
        return create_upscaler(
            model="tiny" if variant.model == "tiny" else "real",
            weights_x2=settings.upscaler_weights_x2,
            weights_x4=settings.upscaler_weights_x4,
            device=variant.device,
            cache_dir=hf_home / "klein-worker" / "upscalers",
            keep_free_bytes=int(settings.upscaler_keep_free_gb * GIB),
            compile_backend=compile_backend,
        )
    except FileNotFoundError as exc:
        raise BootError(str(exc)) from exc


def fetch_upscaler_weights(upscaler: Upscaler) -> None:
    """Download the upscaler checkpoints into the cache now (PRELOAD_MODELS, or the image build),
    so no job waits for them and a wrong URL is a boot error naming its setting."""
    from handlers.errors import JobError

    try:
        upscaler.fetch()
    except JobError as exc:
        raise BootError(exc.message, transient=exc.retryable) from exc


def weights_folder(settings: Settings, variant: Variant, hf_home: Path) -> Path | None:
    """The diffusers folder klein will load, where it is already on this disk: MODEL_PATH, or the
    hub's snapshot under HF_HOME. None for the tiny model, or weights still to download."""
    if variant.model == "tiny":
        return None
    if settings.model_path:
        return Path(settings.model_path)
    from huggingface_hub import snapshot_download

    hub_output_to_logs()
    try:
        snapshot = snapshot_download(HUB_IDS[variant.model], cache_dir=hf_home / "hub", local_files_only=True)
    except OSError:  # LocalEntryNotFoundError: not downloaded (the load downloads, or says why not)
        return None
    return Path(snapshot)


def compile_stores(settings: Settings, hf_home: Path) -> list[BundleStore]:
    """COMPILE_CACHE's stores; inductor's own cache goes into the first folder unless
    TORCHINDUCTOR_CACHE_DIR says otherwise. A bad COMPILE_CACHE value is a boot error. Runs
    before torch is imported, since torch fixes its cache folder the first time it looks."""
    from worker.compile_boot import use_inductor_cache_dir

    def s3_client() -> Any:
        import boto3

        return boto3.client("s3", region_name=settings.aws_region, endpoint_url=settings.aws_endpoint_url)

    try:
        default_folder = hf_home / "klein-worker" / "compile-cache"
        stores = open_stores(settings.compile_cache, default_folder=default_folder, s3_client=s3_client)
    except ValueError as exc:
        raise BootError(str(exc)) from exc
    if not settings.torchinductor_cache_dir:
        use_inductor_cache_dir(stores)
    return stores
