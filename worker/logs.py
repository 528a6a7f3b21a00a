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

# Query parameters that authorise a request: presigned S3/SigV4, SigV2, GCS and Azure SAS.
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId|sig|"
    r"X-Goog-Signature|token|access_token)=)[^&\s\"']+"
)
_BEARER = re.compile(r"(?i)\b(hf_[A-Za-z0-9]{20,}|Bearer\s+[A-Za-z0-9._~+/-]+=*)")


def scrub(text: str) -> str:
    return _BEARER.sub("[REDACTED]", _SECRET_QUERY.sub(r"\1[REDACTED]", text))


class ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Render the traceback now, scrubbed, so the formatter does not re-render it raw.
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


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
            entry["exc"] = record.exc_text
        elif record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
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
    # Library chatter (HTTP connection pools, boto credential lookups) is noise at INFO.
    for noisy in ("botocore", "boto3", "urllib3", "werkzeug", "moto", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
