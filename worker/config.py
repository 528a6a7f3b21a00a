"""Settings, parsed once from the environment (SPEC section 3). The only reader of the environment."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ModelName = Literal["auto", "klein-4b", "klein-9b", "tiny"]
Quantization = Literal["auto", "none", "fp8", "int8", "nunchaku-int4", "nunchaku-fp4"]

MIB = 1024 * 1024


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
        if not (1 <= shape[0] <= 64 and all(256 <= side <= 2048 and side % 16 == 0 for side in shape[1:])):
            raise ValueError(f"COMPILE_SIZES: {item!r} needs sides 256..2048 in multiples of 16, batch 1..64")
        shapes.append(shape)
    return tuple(shapes)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    queue_url: str | None = None
    result_queue_url: str | None = None
    aws_endpoint_url: str | None = None
    aws_region: str = Field(
        default="us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )

    model: ModelName = "auto"
    quantization: Quantization = "auto"
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

    max_batch: int = Field(default=8, ge=1, le=64)
    max_references: int | None = Field(default=None, ge=0, le=64)  # None: from the profile, else built-in
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
    max_download_bytes: int = Field(default=32 * MIB, ge=1)
    # 8192x8192: above any camera, below Pillow's own bomb threshold (see worker/transfer.py).
    max_download_pixels: int = Field(default=8192 * 8192, ge=1)
    webhook_secret: SecretStr | None = None

    upscaler_weights_x2: str | None = None
    upscaler_weights_x4: str | None = None
    # Keep the upscaler loaded between jobs only while this much VRAM stays free.
    upscaler_keep_free_gb: float = Field(default=4.0, ge=0)
    # torch.compile of the transformer's repeated blocks and the VAE decoder; None = on for CUDA.
    torch_compile: bool | None = None
    # Where compiled-engine bundles are kept (worker/compile_store.py): folders and/or s3://bucket/prefix,
    # comma-separated; unset = $HF_HOME/klein-worker/compile-cache; "off" = compile every boot.
    compile_cache: str | None = None
    # The sizes the warm-up compiles, WxH[:BATCH] comma-separated; any other shape runs eager.
    compile_sizes: str = "1024x1024"
    torchinductor_cache_dir: str | None = None
    # A diffusers attention backend for the transformer (e.g. _native_cudnn); unset = diffusers' default.
    attention_backend: str | None = None
    nunchaku_transformer_path: str | None = None

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

    @field_validator("log_level")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()

    def require_queue(self) -> str:
        if not self.queue_url:
            raise SystemExit("QUEUE_URL is required (or run `python -m worker demo`)")
        return self.queue_url
