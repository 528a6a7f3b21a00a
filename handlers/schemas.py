"""Handler inputs and outputs (SPEC section 2): the typed half of the job contract.

Limits that depend on the loaded model (MAX_BATCH, MAX_REFERENCES) come in through the
validation context, so one model serves every deployment:
``GenerateInput.model_validate(data, context=Limits(...).as_context())``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

OutputFormat = Literal["png", "jpeg", "webp"]

MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 256, 2048, 16


@dataclass(frozen=True)
class Limits:
    max_batch: int = 8
    max_references: int = 16

    def as_context(self) -> dict[str, int]:
        return {"max_batch": self.max_batch, "max_references": self.max_references}


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


def _side(value: int) -> int:
    if not MIN_SIDE <= value <= MAX_SIDE or value % SIDE_MULTIPLE:
        raise ValueError(f"must be a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE}")
    return value


class GenerateInput(_Strict):
    prompts: list[Annotated[str, Field(min_length=1, max_length=4000)]] = Field(min_length=1)
    upload_urls: list[HttpUrl] = Field(min_length=1)
    images: list[ImageRef] = Field(default_factory=list)
    width: int = 1024
    height: int = 1024
    num_steps: int = Field(default=4, ge=1, le=50)
    guidance_scale: float = Field(default=1.0, ge=0.0, le=20.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1 - 64)
    upscale: Literal[2, 4] | None = None
    output_format: OutputFormat = "png"
    quality: int = Field(default=90, ge=1, le=100)

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
    quality: int = Field(default=90, ge=1, le=100)

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
