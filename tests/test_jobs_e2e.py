"""Jobs through the real worker: moto SQS in, images in moto S3, results on the result queue."""

from __future__ import annotations

import json
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tests.helpers import queue_counts, results, run_worker, s3_image, send
from tests.scripted_http import png_bytes


def _put(stack, key, content_type="image/png"):
    return stack.presign_put(key, content_type)


def _ref(stack, key, color, size=(96, 80)):
    stack.client("s3").put_object(Bucket=stack.bucket, Key=key, Body=png_bytes(*size, color=color))
    return stack.presign_get(key)


def test_batch_generate_lands_images_in_s3_with_size_format_and_result(stack, engines):
    job = {
        "id": "batch-1",
        "type": "generate",
        "input": {
            "prompts": ["a castle", "a forest", "a river"],
            "upload_urls": [_put(stack, f"batch-1/{i}.webp", "image/webp") for i in range(3)],
            "width": 256,
            "height": 320,
            "seed": 42,
            "output_format": "webp",
        },
    }
    send(stack, job)

    assert run_worker(stack, engines) == 1

    (result,) = results(stack, expected=1)
    assert result["id"] == "batch-1" and result["status"] == "succeeded" and result["error"] is None
    assert result["attempt"] == 1 and result["worker_id"] == "test-worker"
    assert result["model"] == "flux2-klein-tiny"
    items = result["output"]["results"]
    assert [item["seed"] for item in items] == [42, 43, 44]
    for i, item in enumerate(items):
        assert item["success"] and item["error"] is None
        assert item["output_url"] == f"{stack.endpoint}/{stack.bucket}/batch-1/{i}.webp"  # no query string
        assert (item["width"], item["height"]) == (256, 320)
        image, content_type, _ = s3_image(stack, f"batch-1/{i}.webp")
        assert image.format == "WEBP" and content_type == "image/webp"
        assert image.size == (256, 320)
    distinct = {s3_image(stack, f"batch-1/{i}.webp")[2] for i in range(3)}
    assert len(distinct) == 3
    assert queue_counts(stack) == (0, 0)  # the job message is gone


def test_same_seed_reproduces_and_references_change_the_image(stack, engines):
    refs = [_ref(stack, "refs/a.png", (255, 0, 0)), _ref(stack, "refs/b.png", (0, 0, 255), (128, 128))]
    base = {"prompts": ["a hero"], "width": 256, "height": 256, "seed": 5, "output_format": "png"}
    send(
        stack,
        {"id": "plain", "type": "generate", "input": {**base, "upload_urls": [_put(stack, "r/plain.png")]}},
    )
    send(
        stack,
        {"id": "again", "type": "generate", "input": {**base, "upload_urls": [_put(stack, "r/again.png")]}},
    )
    send(
        stack,
        {
            "id": "with-refs",
            "type": "generate",
            "input": {
                **base,
                "upload_urls": [_put(stack, "r/refs.png")],
                "images": [{"url": u} for u in refs],
            },
        },
    )

    assert run_worker(stack, engines) == 3

    by_id = {r["id"]: r for r in results(stack, expected=3)}
    assert {r["status"] for r in by_id.values()} == {"succeeded"}
    plain = s3_image(stack, "r/plain.png")
    again = s3_image(stack, "r/again.png")
    with_refs = s3_image(stack, "r/refs.png")
    assert plain[0].format == "PNG" and plain[1] == "image/png" and plain[0].size == (256, 256)
    assert plain[0].tobytes() == again[0].tobytes()  # same seed, same image
    assert with_refs[0].size == (256, 256)
    assert with_refs[0].tobytes() != plain[0].tobytes()  # the references were used


def test_upscale_job_x2_and_x4_and_generate_with_upscale(stack, engines):
    source = _ref(stack, "up/in.png", (10, 200, 90), size=(80, 48))
    for scale in (2, 4):
        send(
            stack,
            {
                "id": f"up-x{scale}",
                "type": "upscale",
                "input": {
                    "image_url": source,
                    "upload_url": _put(stack, f"up/x{scale}.jpeg", "image/jpeg"),
                    "scale": scale,
                    "output_format": "jpeg",
                    "quality": 80,
                },
            },
        )
    send(
        stack,
        {
            "id": "gen-up",
            "type": "generate",
            "input": {
                "prompts": ["tiny"],
                "upload_urls": [_put(stack, "up/gen.png")],
                "width": 256,
                "height": 256,
                "upscale": 2,
            },
        },
    )

    assert run_worker(stack, engines) == 3

    by_id = {r["id"]: r for r in results(stack, expected=3)}
    for scale in (2, 4):
        out = by_id[f"up-x{scale}"]["output"]
        assert by_id[f"up-x{scale}"]["status"] == "succeeded"
        assert (out["input_width"], out["input_height"]) == (80, 48)
        assert (out["output_width"], out["output_height"]) == (80 * scale, 48 * scale)
        assert out["scale"] == scale and "?" not in out["output_url"]
        image, content_type, _ = s3_image(stack, f"up/x{scale}.jpeg")
        assert (
            image.format == "JPEG" and content_type == "image/jpeg" and image.size == (80 * scale, 48 * scale)
        )
    gen = by_id["gen-up"]["output"]["results"][0]
    assert (gen["width"], gen["height"]) == (512, 512) and gen["timing_upscale_ms"] is not None
    assert s3_image(stack, "up/gen.png")[0].size == (512, 512)


def test_partial_batch_when_one_upload_is_forbidden(stack, engines, scripted):
    send(
        stack,
        {
            "id": "partial",
            "type": "generate",
            "input": {
                "prompts": ["ok", "forbidden"],
                "upload_urls": [
                    _put(stack, "p/ok.png"),
                    f"{scripted.url}/status/403/out.png?X-Amz-Signature=s3cr3t",
                ],
                "width": 256,
                "height": 256,
            },
        },
    )

    run_worker(stack, engines)

    (result,) = results(stack, expected=1)
    assert result["status"] == "partial"
    ok, bad = result["output"]["results"]
    assert ok["success"] and s3_image(stack, "p/ok.png")[0].size == (256, 256)
    assert not bad["success"] and bad["error"]["code"] == "upload_failed"
    assert "upload_urls[1]" in bad["error"]["message"]
    assert scripted.count("/status/403/out.png") == 1  # a 403 is not retried
    assert "s3cr3t" not in json.dumps(result)
    assert queue_counts(stack) == (0, 0)


def test_upload_403_fails_the_job_without_retry(stack, engines, scripted):
    send(
        stack,
        {
            "id": "expired",
            "type": "upscale",
            "input": {
                "image_url": f"{scripted.url}/img/in.png",
                "upload_url": f"{scripted.url}/status/403/out.png?X-Amz-Signature=abc",
            },
        },
    )

    assert run_worker(stack, engines) == 1

    (result,) = results(stack, expected=1)
    assert result["status"] == "failed" and result["error"]["code"] == "upload_failed"
    assert result["attempt"] == 1
    assert scripted.count("/status/403/out.png") == 1
    assert queue_counts(stack) == (0, 0)


def test_flaky_download_is_retried_and_succeeds(stack, engines, scripted):
    send(
        stack,
        {
            "id": "flaky",
            "type": "upscale",
            "input": {
                "image_url": f"{scripted.url}/flaky/2/in.png",
                "upload_url": _put(stack, "f/out.png"),
                "scale": 2,
            },
        },
    )

    run_worker(stack, engines)

    (result,) = results(stack, expected=1)
    assert result["status"] == "succeeded" and result["attempt"] == 1
    assert scripted.count("/flaky/2/in.png") == 3
    assert s3_image(stack, "f/out.png")[0].size == (128, 128)


def test_transient_upload_failure_is_retried_through_the_queue_until_max_attempts(stack, engines, scripted):
    send(
        stack,
        {
            "id": "s3-down",
            "type": "upscale",
            "input": {
                "image_url": f"{scripted.url}/img/in.png",
                "upload_url": f"{scripted.url}/status/503/o.png",
                "scale": 2,
            },
        },
    )

    # Each attempt releases the message (backoff 0 in tests); the third publishes and deletes.
    processed = run_worker(stack, engines, max_attempts=3)

    assert processed == 1
    (result,) = results(stack, expected=1)
    assert result["status"] == "failed" and result["error"]["code"] == "upload_failed"
    assert result["attempt"] == 3
    puts = [r for r in scripted.requests if r[0] == "PUT"]
    assert len(puts) == 3 * 3  # three attempts, each with the transfer client's 3 tries
    assert queue_counts(stack) == (0, 0)


def test_webhook_receives_signed_result(stack, engines, scripted):
    send(
        stack,
        {
            "id": "hooked",
            "type": "upscale",
            "input": {
                "image_url": f"{scripted.url}/img/in.png",
                "upload_url": _put(stack, "h/out.png"),
                "scale": 2,
            },
            "webhook_url": f"{scripted.url}/hook",
        },
    )

    run_worker(stack, engines, webhook_secret="topsecret")

    (post,) = [r for r in scripted.requests if r[0] == "POST"]
    _, path, headers, body = post
    assert path == "/hook"
    # What a receiver runs: the Standard Webhooks verifier, with the same secret.
    receiver = Webhook(b"topsecret")
    payload = receiver.verify(body, headers)
    assert headers["webhook-id"].startswith("msg_")
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    # A tampered body, or the same delivery replayed later, is refused.
    with pytest.raises(WebhookVerificationError):
        receiver.verify(body.replace(b"succeeded", b"failed"), headers)
    stale = {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) - 3600)}
    with pytest.raises(WebhookVerificationError):
        receiver.verify(body, stale)
    assert payload["id"] == "hooked" and payload["status"] == "succeeded"
    assert results(stack, expected=1)[0]["id"] == "hooked"  # the result queue got it too


def test_heartbeat_keeps_a_long_job_invisible_past_the_visibility_timeout(stack, engines, scripted):
    import threading
    import time

    send(
        stack,
        {
            "id": "long",
            "type": "upscale",
            "input": {
                "image_url": f"{scripted.url}/slow/20/in.png",
                "upload_url": _put(stack, "long.png"),
                "scale": 2,
            },
        },
    )
    worker = threading.Thread(target=run_worker, args=(stack, engines), kwargs={"visibility_timeout": 5})
    worker.start()
    assert scripted.hit.wait(60)

    # Twice the 5 s visibility timeout, and 10 s before the input arrives: without the heartbeat
    # a second worker could take it.
    time.sleep(10)
    assert queue_counts(stack) == (0, 1)

    worker.join(60)
    (result,) = results(stack, expected=1)
    assert result["status"] == "succeeded" and result["attempt"] == 1
    assert scripted.count("/slow/20/in.png") == 1


def test_a_dead_webhook_does_not_rerun_a_finished_job(stack, engines, scripted):
    send(
        stack,
        {
            "id": "dead-hook",
            "type": "upscale",
            "input": {
                "image_url": f"{scripted.url}/img/in.png",
                "upload_url": _put(stack, "dh/out.png"),
                "scale": 2,
            },
            "webhook_url": f"{scripted.url}/status/500/hook",
        },
    )

    assert run_worker(stack, engines) == 1

    assert scripted.count("/status/500/hook") == 3  # retried with backoff by the transfer client
    (result,) = results(stack, expected=1)
    assert result["status"] == "succeeded" and result["attempt"] == 1  # the result queue still has it
    assert s3_image(stack, "dh/out.png")[0].size == (128, 128)
    assert queue_counts(stack) == (0, 0)


def test_a_whsec_secret_is_used_as_standard_webhooks_defines_it():
    import base64
    from datetime import UTC, datetime

    from worker.results import signature_headers

    secret = "whsec_" + base64.b64encode(b"sixteen-byte-key").decode()
    body = b'{"id": "a", "status": "succeeded"}'
    headers = signature_headers(body, secret, msg_id="msg_1", at=datetime.now(UTC))
    assert Webhook(secret).verify(body, headers) == {"id": "a", "status": "succeeded"}
    with pytest.raises(WebhookVerificationError):  # the literal text is not the key
        Webhook(secret.encode()).verify(body, headers)
