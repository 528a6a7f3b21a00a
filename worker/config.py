"""Settings, parsed once from the environment (SPEC section 3). The only reader of the environment."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The official Real-ESRGAN release files, checksum-pinned where they are defined (torch-free module).
from handlers.engines.weights import REALESRGAN_X2PLUS_URL, REALESRGAN_X4PLUS_URL
from klein_facts.compile_regions import DEFAULT_COMPILE_REGIONS, parse_regions
from klein_facts.jobs import (
    DEFAULT_HEIGHT,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_LORAS,
    DEFAULT_WIDTH,
    MAX_BATCH_CAP,
    MAX_DOWNLOAD_BYTES,
    MAX_DOWNLOAD_PIXELS,
    MAX_LORAS_CAP,
    MAX_REFERENCES_CAP,
    MAX_SIDE,
    MIB,
    MIN_SIDE,
    SIDE_MULTIPLE,
)
from klein_facts.variants import ModelSetting, QuantizationSetting

# Where AWS_REGION is not set and the queue URL names none (ElasticMQ, moto, LocalStack).
FALLBACK_REGION = "us-east-1"


def _default_worker_id() -> str:
    # Vast sets CONTAINER_ID; elsewhere the hostname is the most useful identity.
    container = os.environ.get("CONTAINER_ID")
    return f"vast-{container}" if container else socket.gethostname()


def parse_sizes(text: str) -> tuple[tuple[int, int, int], ...]:
    """``"1024x1024,768x1344:2"`` -> ((1, 1024, 1024), (2, 768, 1344)); a clear error otherwise."""
    shapes = []
    for item in (part.strip() for part in text.split(",")):
        size, _, batch = item.partition(":")
        width, _, height = size.lower().partition("x")
        try:
            shape = (int(batch or 1), int(width), int(height))
        except ValueError:
            raise ValueError(f"COMPILE_SIZES: {item!r} is not WIDTHxHEIGHT[:BATCH]") from None
        # The job limits (SPEC section 2): a size no job can ask for is not worth compiling.
        sides_ok = all(MIN_SIDE <= side <= MAX_SIDE and side % SIDE_MULTIPLE == 0 for side in shape[1:])
        if not (1 <= shape[0] <= MAX_BATCH_CAP and sides_ok):
            raise ValueError(
                f"COMPILE_SIZES: {item!r} needs sides {MIN_SIDE}..{MAX_SIDE} in multiples of "
                f"{SIDE_MULTIPLE}, batch 1..{MAX_BATCH_CAP}"
            )
        shapes.append(shape)
    return tuple(shapes)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    queue_url: str | None = None
    queue_urls: str | None = None  # comma-separated, highest priority first; QUEUE_URL is the one-queue form
    # While lower queues have work, about this share of the jobs taken comes from them (0: strict priority).
    lower_queue_share: float = Field(default=0.0, ge=0.0, le=0.5)
    result_queue_url: str | None = None
    aws_endpoint_url: str | None = None
    # Unset: the region in QUEUE_URL (https://sqs.eu-west-1.amazonaws.com/...), else us-east-1.
    aws_region: str = Field(default="", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"))

    model: ModelSetting = "auto"
    quantization: QuantizationSetting = "auto"
    model_path: str | None = None
    hf_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("HF_TOKEN", "HUGGING_FACE_TOKEN")
    )
    hf_home: str | None = None
    allow_non_commercial: bool = False
    benchmark_profile: str | None = None
    preload_models: bool = True
    device: str | None = None  # "cpu"/"cuda"; None = cuda when available
    cuda_visible_devices: str | None = None

    max_batch: int = Field(default=DEFAULT_MAX_BATCH, ge=1, le=MAX_BATCH_CAP)
    # None: from the benchmark profile, else klein_facts.jobs.DEFAULT_MAX_REFERENCES (worker/app.py).
    max_references: int | None = Field(default=None, ge=0, le=MAX_REFERENCES_CAP)
    max_attempts: int = Field(default=3, ge=1, le=100)
    visibility_timeout: int = Field(default=120, ge=5, le=43200)
    shutdown_grace_seconds: float = Field(default=25.0, ge=0)
    idle_shutdown_seconds: float = Field(default=0.0, ge=0)
    container_id: str | None = None
    container_api_key: SecretStr | None = None
    vast_api_url: str = "https://console.vast.ai"
    # Jobs in hand at once: 2 lets job N+1's download and inference overlap job N's encode and upload.
    job_concurrency: int = Field(default=2, ge=1, le=8)
    wait_time_seconds: int = Field(default=20, ge=0, le=20)
    retry_backoff_seconds: int = Field(default=10, ge=0, le=900)  # first retry delay; doubles per attempt

    allow_private_urls: bool = False
    max_download_bytes: int = Field(default=MAX_DOWNLOAD_BYTES, ge=1)
    max_download_pixels: int = Field(default=MAX_DOWNLOAD_PIXELS, ge=1)
    webhook_secret: SecretStr | None = None

    # Per-job LoRA adapters (handlers/engines/lora.py). 0 turns them off (and, when compiled, the
    # hotswap slots with their per-image cost).
    max_loras: int = Field(default=DEFAULT_MAX_LORAS, ge=0, le=MAX_LORAS_CAP)
    # A FLUX LoRA of rank 128 on all of klein-9B's layers is ~0.5 GB in bf16; more is not an adapter.
    max_lora_bytes: int = Field(default=512 * MIB, ge=1)
    lora_cache_gb: float = Field(default=10.0, ge=0)  # adapter files on disk, LRU by content hash
    # Compiled transformer: adapters are hot-swapped into slots of this rank (no recompile); a
    # higher-rank adapter is refused with invalid_input.
    lora_max_rank: int = Field(default=64, ge=1, le=1024)
    # huggingface_hub's own switch; with it set, {"repo": ...} adapters are refused (no hub access).
    hf_hub_offline: bool = False

    # Path or URL of a spandrel-loadable checkpoint; set to "" to serve no upscale at that scale.
    upscaler_weights_x2: str | None = REALESRGAN_X2PLUS_URL
    upscaler_weights_x4: str | None = REALESRGAN_X4PLUS_URL
    # Keep the upscaler loaded between jobs only while this much VRAM stays free.
    upscaler_keep_free_gb: float = Field(default=4.0, ge=0)
    # torch.compile of the transformer's repeated blocks and the VAE decoder; None = on for CUDA.
    torch_compile: bool | None = None
    # Where compiled-engine bundles are kept (worker/compile_store.py): folders and/or s3://bucket/prefix,
    # comma-separated; unset = $HF_HOME/klein-worker/compile-cache; "off" = compile every boot.
    compile_cache: str | None = None
    # Torch's own switch (read by torch too, which defaults it off): whether the compile cache's
    # bundles carry dynamo's output, so that a hit traces nothing (handlers/engines/compile_cache.py).
    # The worker turns it on; only an explicit 0/false turns it off.
    torch_caching_precompile: bool = True
    # The sizes the warm-up compiles, WxH[:BATCH] comma-separated; any other shape runs eager.
    compile_sizes: str = f"{DEFAULT_WIDTH}x{DEFAULT_HEIGHT}"
    # What TORCH_COMPILE compiles (klein_facts/compile_regions.py), comma-separated.
    compile_regions: str = ",".join(DEFAULT_COMPILE_REGIONS)
    torchinductor_cache_dir: str | None = None
    # A diffusers attention backend for the transformer (e.g. _native_cudnn); unset = diffusers' default.
    attention_backend: str | None = None
    nunchaku_transformer_path: str | None = None

    # This worker's $/h (the instance's price over the workers it runs): results then carry cost_usd.
    price_per_hour: float | None = Field(default=None, ge=0)

    metrics_port: int | None = None
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    worker_id: str = Field(default_factory=_default_worker_id)

    @field_validator("compile_sizes")
    @classmethod
    def _sizes(cls, v: str) -> str:
        parse_sizes(v)
        return v

    def compile_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """COMPILE_SIZES as (batch, width, height) tuples."""
        return parse_sizes(self.compile_sizes)

    @field_validator("compile_regions")
    @classmethod
    def _regions(cls, v: str) -> str:
        parse_regions(v)
        return v

    def compiled_regions(self) -> tuple[str, ...]:
        """COMPILE_REGIONS as names, in klein_facts' order (TORCH_COMPILE says whether to compile at all)."""
        return parse_regions(self.compile_regions)

    def regions_to_compile(self, device: str) -> tuple[str, ...]:
        """What a worker on ``device`` compiles: COMPILE_REGIONS when TORCH_COMPILE is on (by
        default on CUDA only), else nothing."""
        compile_ = self.torch_compile if self.torch_compile is not None else device == "cuda"
        return self.compiled_regions() if compile_ else ()

    @field_validator("log_level")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()

    @field_validator("upscaler_weights_x2", "upscaler_weights_x4")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v.strip() or None if v is not None else None

    @model_validator(mode="after")
    def _region(self) -> Settings:
        if not self.aws_region:
            first = self.queue_url or (self.queue_urls or "").split(",")[0].strip()
            self.aws_region = region_from_queue_url(first) or FALLBACK_REGION
        return self

    def require_queue(self) -> str:
        """The one queue jobs are sent to (``worker enqueue``): QUEUE_URL, else the highest of QUEUE_URLS."""
        return self.require_queues()[0]

    def require_queues(self) -> list[str]:
        """The job queues, highest priority first."""
        urls = [u.strip() for u in (self.queue_urls or "").split(",") if u.strip()]
        if urls and self.queue_url:
            raise SystemExit("set QUEUE_URL (one queue) or QUEUE_URLS (several, highest first), not both")
        if self.queue_url:
            return [self.queue_url]
        if not urls:
            raise SystemExit("QUEUE_URL or QUEUE_URLS is required (or run `python -m worker demo`)")
        if len(set(urls)) != len(urls):
            raise SystemExit("QUEUE_URLS lists the same queue twice")
        return urls


def region_from_queue_url(queue_url: str) -> str | None:
    """``https://sqs.eu-west-1.amazonaws.com/123/q`` -> ``eu-west-1``; other endpoints name none."""
    host = queue_url.split("://", 1)[-1].split("/", 1)[0]
    parts = host.split(".")
    if len(parts) > 3 and parts[0] == "sqs" and parts[-2] == "amazonaws":
        return parts[1]
    return None
