"""Structured logging: one JSON object per line, job events carry their fields.

A job event is logged as ``log.info("job %s", status, extra={"job": {...}})``; the JSON
formatter lifts the ``job`` dict to top-level keys. A scrubbing filter removes presigned
query strings and credentials from every record as a last line of defence: code should
already log only redacted URLs, but a library's exception text might not.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from worker.urls import RedactQueryFilter, redact_text

# Tokens that may appear outside URLs: Hugging Face tokens and bearer credentials.
_BEARER = re.compile(r"(?i)\b(hf_[A-Za-z0-9]{20,}|Bearer\s+[A-Za-z0-9._~+/-]+=*)")


def scrub(text: str) -> str:
    """Query strings (presigned signatures) and bearer tokens out of free text."""
    return _BEARER.sub("[REDACTED]", redact_text(text))


class ScrubFilter(RedactQueryFilter):
    """The URL redaction filter, also scrubbing bearer and Hugging Face tokens."""

    redact = staticmethod(scrub)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job = getattr(record, "job", None)
        if isinstance(job, dict):
            entry.update(job)
        if record.exc_text:
            entry["exc"] = record.exc_text  # rendered and scrubbed by ScrubFilter
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job = getattr(record, "job", None)
        if isinstance(job, dict):
            text += " " + " ".join(f"{k}={v}" for k, v in job.items())
        return text


def configure_logging(*, level: str = "INFO", fmt: str = "json", stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ScrubFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # A library's warnings.warn would otherwise print a bare line among the JSON ones (huggingface_hub
    # deprecations, torch's user warnings): routed through the handler, it is one more log line.
    logging.captureWarnings(True)
    # Library chatter (HTTP connection pools, boto credential lookups) is noise at INFO.
    for noisy in ("botocore", "boto3", "urllib3", "werkzeug", "moto", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # Warnings about the libraries' own pairing, not about anything an operator can change:
    # torchao registers enums the way torch now deprecates, and diffusers' torchao loader cannot
    # import torchao 0.18's tensor classes (we quantize modules directly; handlers/engines/quantize.py).
    for internal in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
        logging.getLogger(internal).setLevel(max(logging.ERROR, logging.getLevelName(level)))
