"""Structured logs: one JSON object per line with the job's fields; no secrets, even in tracebacks."""

from __future__ import annotations

import io
import json
import logging

import pytest

from worker.logs import configure_logging


@pytest.fixture
def stream():
    # conftest's autouse fixture puts the process-wide logging state back afterwards.
    buf = io.StringIO()
    configure_logging(level="INFO", fmt="json", stream=buf)
    return buf


def test_job_event_is_one_json_line_with_its_fields(stream):
    fields = {
        "id": "job-1",
        "type": "generate",
        "attempt": 2,
        "status": "succeeded",
        "timing_inference_ms": 310,
    }
    logging.getLogger("worker.runner").info("job %s", "succeeded", extra={"job": fields})

    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["msg"] == "job succeeded" and entry["level"] == "info"
    assert {k: entry[k] for k in fields} == fields


def test_a_library_warning_is_a_json_line_too(stream):
    import warnings

    # huggingface_hub and torch speak through warnings.warn; a bare line would break the log's format.
    warnings.warn("The `local_dir_use_symlinks` argument is deprecated", UserWarning, stacklevel=1)

    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["logger"] == "py.warnings"
    assert "local_dir_use_symlinks" in entry["msg"]


def test_presigned_signatures_and_tokens_never_reach_the_log(stream):
    url = "https://bucket.s3.amazonaws.com/out.png?X-Amz-Credential=AKIA123&X-Amz-Signature=deadbeef"
    log = logging.getLogger("urllib3.connectionpool")
    log.warning("PUT %s failed with token hf_abcdefghijklmnopqrstuvwx", url)
    try:
        raise RuntimeError(f"upload to {url} refused")
    except RuntimeError:
        logging.getLogger("worker.runner").exception("job failed")

    text = stream.getvalue()
    assert "deadbeef" not in text and "AKIA123" not in text and "hf_abcdefghij" not in text
    entries = [json.loads(line) for line in text.splitlines()]
    assert "https://bucket.s3.amazonaws.com/out.png?<redacted>" in entries[0]["msg"]
    assert "RuntimeError" in entries[1]["exc"]


def test_a_job_whose_result_cannot_be_published_keeps_its_id_on_the_log_line(stream, stack, engines):
    from tests.helpers import run_worker, send

    send(
        stack, {"id": "unpublished", "type": "upscale", "input": {"image_url": "ftp://x", "upload_url": "x"}}
    )
    gone = stack.result_queue_url.rsplit("/", 1)[0] + "/no-such-result-queue"

    run_worker(stack, engines, result_queue_url=gone, max_attempts=1)

    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    settled = [e for e in entries if e["msg"] in ("job retry", "job unsettled")]
    assert settled  # burst mode keeps polling while the message comes back
    for entry in settled:
        assert entry["id"] == "unpublished" and entry["type"] == "upscale"
        assert entry["error_code"] == "invalid_input"  # what the job ended in, though not published
