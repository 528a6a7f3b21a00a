"""The job envelope and the result (SPEC section 2); handler inputs live in ``handlers.schemas``.

``parse_job`` turns a raw SQS body into a validated job or raises ``InvalidInput`` whose
message names every offending field (``input.width: ...``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from handlers.errors import InvalidInput
from handlers.schemas import GenerateInput, Limits, UpscaleInput

JobType = Literal["generate", "upscale"]
Status = Literal["succeeded", "partial", "failed"]

INPUT_MODELS: dict[str, type[BaseModel]] = {"generate": GenerateInput, "upscale": UpscaleInput}
ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


class JobEnvelope(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(pattern=ID_PATTERN)
    type: JobType
    input: dict[str, Any]
    webhook_url: str | None = Field(default=None, pattern=r"^https?://", max_length=4096)


@dataclass(frozen=True)
class Job:
    id: str
    type: JobType
    input: GenerateInput | UpscaleInput
    webhook_url: str | None


class JobResult(BaseModel):
    id: str
    type: str | None
    status: Status
    output: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    attempt: int
    worker_id: str
    model: str
    received_at: str
    finished_at: str
    sqs_message_id: str | None = None  # set when the body had no usable id
    queue: str | None = None  # the URL of the queue the job came from
    gpu_seconds: float = 0.0  # time the job held the model (the GPU lock)
    cost_usd: float | None = None  # its share of PRICE_PER_HOUR (worker.cost); null without a price


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _describe(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "input"
        parts.append(f"{prefix}{loc}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def peek_identity(body: str) -> tuple[str | None, str | None, str | None]:
    """Best-effort (id, type, webhook_url) from a body that may be invalid, for the error result."""
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, None, None
    if not isinstance(raw, dict):
        return None, None, None
    job_id = raw.get("id")
    valid_id = isinstance(job_id, str) and re.fullmatch(ID_PATTERN, job_id) is not None
    job_type = raw.get("type") if raw.get("type") in INPUT_MODELS else None
    hook = raw.get("webhook_url")
    return (job_id if valid_id else None), job_type, (hook if isinstance(hook, str) else None)


def parse_job(body: str, limits: Limits) -> Job:
    try:
        raw = json.loads(body)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"body: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc
    if not isinstance(raw, dict):
        raise InvalidInput(f"body: expected a JSON object, got {type(raw).__name__}")
    try:
        envelope = JobEnvelope.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(_describe(exc)) from exc
    model = INPUT_MODELS[envelope.type]
    try:
        job_input = model.model_validate(envelope.input, context=limits.as_context())
    except ValidationError as exc:
        raise InvalidInput(_describe(exc, prefix="input.")) from exc
    return Job(id=envelope.id, type=envelope.type, input=job_input, webhook_url=envelope.webhook_url)  # type: ignore[arg-type]
