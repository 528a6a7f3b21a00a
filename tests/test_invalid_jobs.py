"""SPEC section 7: every kind of bad input gets a failed result with a clear code naming the field,
is deleted (never retried), and the worker goes on to the next job."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from tests.helpers import queue_counts, results, run_worker, send

OK_PUT = "http://127.0.0.1:9/never-used.png"


def _gen(**inp):
    base = {"prompts": ["a cat"], "upload_urls": [OK_PUT], "width": 256, "height": 256}
    return {"id": "bad", "type": "generate", "input": {**base, **inp}}


def _bomb_png() -> bytes:
    # A real PNG declaring 12000 x 12000 pixels that compresses to a few hundred KB.
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


CASES = [
    # (name, body or job, expected code, words the message must contain)
    ("not json", "{this is not json", "invalid_input", ["body", "JSON"]),
    ("json array", "[1, 2]", "invalid_input", ["body", "object"]),
    ("wrong type width", _gen(width="1024"), "invalid_input", ["input.width"]),
    ("prompts not list", _gen(prompts="a cat"), "invalid_input", ["input.prompts"]),
    ("empty prompt", _gen(prompts=["  "]), "invalid_input", ["input.prompts"]),
    ("mismatched lengths", _gen(prompts=["a", "b"]), "invalid_input", ["upload_urls", "2 prompts"]),
    (
        "too many prompts",
        _gen(prompts=["a"] * 9, upload_urls=[OK_PUT] * 9),
        "invalid_input",
        ["input.prompts", "MAX_BATCH"],
    ),
    (
        "too many references",
        _gen(images=[{"url": "http://127.0.0.1:9/r.png"}] * 11),
        "invalid_input",
        ["input.images", "MAX_REFERENCES"],
    ),
    ("width too small", _gen(width=128), "invalid_input", ["input.width", "256"]),
    ("height not multiple", _gen(height=1000), "invalid_input", ["input.height", "16"]),
    ("too many steps", _gen(num_steps=51), "invalid_input", ["input.num_steps"]),
    ("bad upscale", _gen(upscale=3), "invalid_input", ["input.upscale"]),
    ("bad format", _gen(output_format="gif"), "invalid_input", ["input.output_format"]),
    ("ftp upload url", _gen(upload_urls=["ftp://example.com/x.png"]), "invalid_input", ["input.upload_urls"]),
    ("file reference", _gen(images=[{"url": "file:///etc/passwd"}]), "invalid_input", ["input.images.0.url"]),
    ("unknown field", _gen(widht=512), "invalid_input", ["input.widht", "Extra"]),
    ("unknown envelope field", {**_gen(), "priority": 1}, "invalid_input", ["priority"]),
    ("bad type", {"id": "bad", "type": "paint", "input": {}}, "invalid_input", ["type"]),
    ("bad id", {"id": "has spaces!", "type": "upscale", "input": {}}, "invalid_input", ["id"]),
]


@pytest.mark.parametrize(("name", "job", "code", "words"), CASES, ids=[c[0] for c in CASES])
def test_invalid_job_gets_failed_result_naming_the_field(stack, engines, name, job, code, words):
    send(stack, job)
    # A good job behind the bad one proves the worker kept running.
    send(
        stack,
        {
            "id": "good",
            "type": "upscale",
            "input": {"image_url": _png_url(stack), "upload_url": stack.presign_put("good.png"), "scale": 2},
        },
    )

    assert run_worker(stack, engines, max_references=10) == 2

    found = results(stack, expected=2)
    bad = next(r for r in found if r["status"] == "failed")
    good = next(r for r in found if r["id"] == "good")
    assert good["status"] == "succeeded"
    assert bad["error"]["code"] == code
    for word in words:
        assert word in bad["error"]["message"], bad["error"]["message"]
    assert queue_counts(stack) == (0, 0)  # deleted, not retried
    assert queue_counts(stack, stack.dlq_url) == (0, 0)


def test_body_without_usable_id_reports_the_sqs_message_id(stack, engines):
    message_id = send(stack, "not json at all")
    run_worker(stack, engines)
    (result,) = results(stack, expected=1)
    assert result["status"] == "failed" and result["error"]["code"] == "invalid_input"
    assert result["id"] == message_id and result["sqs_message_id"] == message_id


def _png_url(stack, key="src.png", size=(64, 64)):
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    stack.client("s3").put_object(Bucket=stack.bucket, Key=key, Body=buf.getvalue())
    return stack.presign_get(key)


@pytest.mark.parametrize(
    ("body", "content_type", "words"),
    [
        (b"<html>not an image</html>", "text/html", ["image_url"]),
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "image/png", ["image_url", "image"]),
    ],
    ids=["html", "truncated-png"],
)
def test_non_image_download_is_invalid_input(stack, engines, scripted, body, content_type, words):
    scripted.bodies["/img/x.png"] = body
    scripted.content_types["/img/x.png"] = content_type
    send(
        stack,
        {
            "id": "nonimage",
            "type": "upscale",
            "input": {"image_url": f"{scripted.url}/img/x.png", "upload_url": stack.presign_put("n.png")},
        },
    )
    run_worker(stack, engines)
    (result,) = results(stack, expected=1)
    assert result["error"]["code"] == "invalid_input"
    for word in words:
        assert word in result["error"]["message"]
    assert scripted.count("/img/x.png") == 1  # permanent: not retried


def test_oversized_download_and_decompression_bomb_are_refused(stack, engines, scripted):
    scripted.bodies["/img/big.png"] = b"\x89PNG" + b"\0" * 2_000_000
    scripted.bodies["/img/bomb.png"] = _bomb_png()
    for name in ("big", "bomb"):
        send(
            stack,
            {
                "id": name,
                "type": "upscale",
                "input": {
                    "image_url": f"{scripted.url}/img/{name}.png",
                    "upload_url": stack.presign_put("o.png"),
                },
            },
        )

    run_worker(stack, engines, max_download_bytes=1_000_000, max_download_pixels=50_000_000)

    by_id = {r["id"]: r for r in results(stack, expected=2)}
    assert by_id["big"]["error"]["code"] == "invalid_input"
    assert "image_url" in by_id["big"]["error"]["message"]
    assert by_id["bomb"]["error"]["code"] == "invalid_input"
    assert "pixels" in by_id["bomb"]["error"]["message"] or "bomb" in by_id["bomb"]["error"]["message"]


def test_private_addresses_refused_unless_allowed(stack, engines, scripted):
    job = {
        "id": "ssrf",
        "type": "upscale",
        "input": {
            "image_url": "http://169.254.169.254/latest/meta-data/x.png",
            "upload_url": f"{scripted.url}/o.png",
        },
    }
    send(stack, job)
    send(
        stack,
        {**job, "id": "ssrf-loopback", "input": {**job["input"], "image_url": f"{scripted.url}/img/in.png"}},
    )

    run_worker(stack, engines, allow_private_urls=False)

    by_id = {r["id"]: r for r in results(stack, expected=2)}
    for result in by_id.values():
        assert result["status"] == "failed" and result["error"]["code"] == "invalid_input"
        assert "image_url" in result["error"]["message"]
    assert scripted.requests == []  # nothing reached the loopback server
    assert json.dumps(by_id)  # results are serialisable
