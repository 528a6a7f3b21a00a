"""Handler inputs and outputs (SPEC section 2): the typed half of the job contract.

Limits that depend on the loaded model (MAX_BATCH, MAX_REFERENCES) come in through the
validation context, so one model serves every deployment:
``GenerateInput.model_validate(data, context=Limits(...).as_context())``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from klein_facts.jobs import (
    DEFAULT_HEIGHT,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_LORAS,
    DEFAULT_MAX_REFERENCES,
    DEFAULT_QUALITY,
    DEFAULT_WIDTH,
    MAX_SIDE,
    MIN_SIDE,
    SIDE_MULTIPLE,
    OutputFormat,
)

Quality = Annotated[int, Field(ge=1, le=100)]


@dataclass(frozen=True)
class Limits:
    max_batch: int = DEFAULT_MAX_BATCH
    max_references: int = DEFAULT_MAX_REFERENCES
    max_loras: int = DEFAULT_MAX_LORAS

    def as_context(self) -> dict[str, int]:
        return {
            "max_batch": self.max_batch,
            "max_references": self.max_references,
            "max_loras": self.max_loras,
        }


def _http_url(value: str) -> str:
    scheme = value.split(":", 1)[0].lower() if ":" in value else ""
    if scheme not in ("http", "https"):
        raise ValueError("must be an http(s) URL")
    return value


HttpUrl = Annotated[str, Field(min_length=8, max_length=8192)]


class _Strict(BaseModel):
    # strict: "1024" is not a width; JSON types must be right, as the contract says.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ImageRef(_Strict):
    url: HttpUrl

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _http_url(v)


# A Hugging Face repo id: owner/name, the characters the hub allows.
_REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
# A file inside that repo: path segments without "..", ending in .safetensors (no pickles).
_WEIGHT_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9._/-]{0,199}\.safetensors$"
MAX_LORA_SCALE = 2.0


class LoraRef(_Strict):
    """One LoRA adapter for this job: a URL (fetched like a reference image) or a hub file."""

    url: HttpUrl | None = None
    repo: Annotated[str, Field(pattern=_REPO_ID)] | None = None
    weight_name: Annotated[str, Field(pattern=_WEIGHT_NAME)] = "pytorch_lora_weights.safetensors"
    scale: float = Field(default=1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else _http_url(v)

    @field_validator("weight_name")
    @classmethod
    def _no_parent(cls, v: str) -> str:
        if ".." in v.split("/"):
            raise ValueError("must be a path inside the repo")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> LoraRef:
        if (self.url is None) == (self.repo is None):
            raise ValueError('give either "url" or "repo" (with "weight_name"), not both or neither')
        if self.url is not None and "weight_name" in self.model_fields_set:
            raise ValueError('"weight_name" goes with "repo", not with "url"')
        return self


def _side(value: int) -> int:
    if not MIN_SIDE <= value <= MAX_SIDE or value % SIDE_MULTIPLE:
        raise ValueError(f"must be a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE}")
    return value


class GenerateInput(_Strict):
    prompts: list[Annotated[str, Field(min_length=1, max_length=4000)]] = Field(min_length=1)
    upload_urls: list[HttpUrl] = Field(min_length=1)
    images: list[ImageRef] = Field(default_factory=list)
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    num_steps: int = Field(default=4, ge=1, le=50)
    guidance_scale: float = Field(default=1.0, ge=0.0, le=20.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1 - 64)
    upscale: Literal[2, 4] | None = None
    output_format: OutputFormat = "png"
    quality: Quality = DEFAULT_QUALITY
    loras: list[LoraRef] = Field(default_factory=list)

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("prompts must be non-empty strings")
        max_batch = (info.context or {}).get("max_batch", Limits.max_batch)
        if len(v) > max_batch:
            raise ValueError(f"at most {max_batch} prompts per job (MAX_BATCH), got {len(v)}")
        return v

    @field_validator("upload_urls")
    @classmethod
    def _upload_urls(cls, v: list[str]) -> list[str]:
        return [_http_url(u) for u in v]

    @field_validator("images")
    @classmethod
    def _images(cls, v: list[ImageRef], info: ValidationInfo) -> list[ImageRef]:
        max_refs = (info.context or {}).get("max_references", Limits.max_references)
        if len(v) > max_refs:
            raise ValueError(f"at most {max_refs} reference images (MAX_REFERENCES), got {len(v)}")
        return v

    @field_validator("loras")
    @classmethod
    def _loras(cls, v: list[LoraRef], info: ValidationInfo) -> list[LoraRef]:
        max_loras = (info.context or {}).get("max_loras", Limits.max_loras)
        if len(v) > max_loras:
            raise ValueError(f"at most {max_loras} LoRA adapters per job (MAX_LORAS), got {len(v)}")
        return v

    @field_validator("width", "height")
    @classmethod
    def _sides(cls, v: int) -> int:
        return _side(v)

    @model_validator(mode="after")
    def _lengths(self) -> GenerateInput:
        if len(self.upload_urls) != len(self.prompts):
            raise ValueError(
                f"upload_urls: {len(self.upload_urls)} URLs for {len(self.prompts)} prompts; "
                "give one upload URL per prompt"
            )
        return self


class UpscaleInput(_Strict):
    image_url: HttpUrl
    upload_url: HttpUrl
    scale: Literal[2, 4] = 4
    output_format: OutputFormat = "png"
    quality: Quality = DEFAULT_QUALITY

    @field_validator("image_url", "upload_url")
    @classmethod
    def _urls(cls, v: str) -> str:
        return _http_url(v)


class GeneratedImage(BaseModel):
    index: int
    success: bool
    output_url: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int
    timing_inference_ms: int | None = None
    timing_upscale_ms: int | None = None
    timing_upload_ms: int | None = None
    error: dict[str, str] | None = None


class GenerateOutput(BaseModel):
    results: list[GeneratedImage]
    timing_total_ms: int


class UpscaleOutput(BaseModel):
    output_url: str
    input_width: int
    input_height: int
    output_width: int
    output_height: int
    scale: int
    timing_download_ms: int
    timing_load_ms: int
    timing_upscale_ms: int
    timing_upload_ms: int
    timing_total_ms: int
