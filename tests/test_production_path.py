"""The deployed code path on a CPU: `python -m worker` with MODEL=klein-4b loading a diffusers
folder (MODEL_PATH), the upscalers fetched from URLs (at boot, on demand, or baked by
`fetch-weights`), jobs through moto SQS/S3. Misconfigurations: tests/test_cannot_serve.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

from tests.helpers import ROOT, queue_counts, results, s3_image, send, spawn_worker
from tests.production import BOOT_TIMEOUT_S, log_lines, production_env, serve_checkpoints
from tests.scripted_http import ScriptedServer, png_bytes


def _upload(stack, key: str) -> str:
    return stack.presign_put(key, "image/png")


def _input_image(stack, key: str, size: tuple[int, int]) -> str:
    stack.client("s3").put_object(Bucket=stack.bucket, Key=key, Body=png_bytes(*size, color=(30, 140, 200)))
    return stack.presign_get(key)


def _stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    return stderr


def test_real_model_folder_generates_and_upscales_with_url_weights(stack, tmp_path, klein_folder):
    host = ScriptedServer()  # its own request counts
    urls = serve_checkpoints(host)
    send(
        stack,
        {
            "id": "gen-up",
            "type": "generate",
            "input": {
                "prompts": ["a lighthouse"],
                "upload_urls": [_upload(stack, "prod/gen.png")],
                "width": 256,
                "height": 320,
                "num_steps": 2,
                "seed": 3,
                "upscale": 2,
            },
        },
    )
    for scale in (2, 4):
        send(
            stack,
            {
                "id": f"up-x{scale}",
                "type": "upscale",
                "input": {
                    "image_url": _input_image(stack, f"prod/in{scale}.png", (48, 40)),
                    "upload_url": _upload(stack, f"prod/up{scale}.png"),
                    "scale": scale,
                },
            },
        )
    proc = spawn_worker(stack, **production_env(tmp_path, klein_folder, urls))
    try:
        found = {r["id"]: r for r in results(stack, expected=3, wait=5, timeout_s=BOOT_TIMEOUT_S)}
    finally:
        stderr = _stop(proc)
        host.close()

    assert set(found) == {"gen-up", "up-x2", "up-x4"}, stderr
    for result in found.values():
        assert result["status"] == "succeeded", (json.dumps(result), stderr[-3000:])
        assert result["model"] == "flux2-klein-4b-bf16"  # the real variant's name, from the folder
    (item,) = found["gen-up"]["output"]["results"]
    assert (item["width"], item["height"]) == (512, 640) and item["timing_upscale_ms"] is not None
    assert s3_image(stack, "prod/gen.png")[0].size == (512, 640)
    for scale in (2, 4):
        output = found[f"up-x{scale}"]["output"]
        assert (output["output_width"], output["output_height"]) == (48 * scale, 40 * scale)
        image, content_type, _ = s3_image(stack, f"prod/up{scale}.png")
        assert image.size == (48 * scale, 40 * scale) and content_type == "image/png"
    assert queue_counts(stack) == (0, 0)
    # PRELOAD_MODELS (default): each checkpoint fetched once, at boot, into the cache under HF_HOME.
    assert host.count("/releases/RealESRGAN_x2plus.pth") == host.count("/releases/RealESRGAN_x4plus.pth") == 1
    cache = tmp_path / "hf" / "klein-worker" / "upscalers"
    cached = sorted(p.name.split("-", 1)[1] for p in cache.iterdir())
    assert cached == ["RealESRGAN_x2plus.pth", "RealESRGAN_x4plus.pth"]
    # The folder's weights were read ahead while the worker imported torch (worker/prefetch.py).
    (ready,) = [line for line in log_lines(stderr) if line.get("event") == "ready"]
    assert ready["boot"]["prefetch_gb"] > 0 and ready["boot"]["prefetch_s"] is not None
    messages = [line["msg"] for line in log_lines(stderr)]  # every line is JSON: no traceback, no bar
    ready = next(i for i, m in enumerate(messages) if m.startswith("ready: flux2-klein-4b-bf16 on cpu"))
    fetched = [i for i, m in enumerate(messages) if m.startswith("upscaler weights") and "downloaded" in m]
    assert len(fetched) == 2 and max(fetched) < ready  # before the worker took its first job


def test_without_preload_nothing_is_fetched_until_an_upscale_job(stack, tmp_path, klein_folder, weight_urls):
    host = ScriptedServer()  # its own request counts
    try:
        urls = serve_checkpoints(host)
        send(
            stack,
            {
                "id": "gen-only",
                "type": "generate",
                "input": {
                    "prompts": ["a boat"],
                    "upload_urls": [_upload(stack, "lazy/gen.png")],
                    "width": 256,
                    "height": 256,
                    "num_steps": 1,
                },
            },
        )
        env = production_env(tmp_path, klein_folder, urls, PRELOAD_MODELS="false")
        proc = spawn_worker(stack, **env)
        try:
            (first,) = results(stack, expected=1, wait=5, timeout_s=BOOT_TIMEOUT_S)
            fetched_before_upscale = len(host.requests)
            send(
                stack,
                {
                    "id": "up-lazy",
                    "type": "upscale",
                    "input": {
                        "image_url": _input_image(stack, "lazy/in.png", (32, 32)),
                        "upload_url": _upload(stack, "lazy/up.png"),
                        "scale": 4,
                    },
                },
            )
            (second,) = results(stack, expected=1, wait=5, timeout_s=BOOT_TIMEOUT_S)
        finally:
            _stop(proc)
    finally:
        host.close()

    assert first["id"] == "gen-only" and first["status"] == "succeeded", first
    assert fetched_before_upscale == 0  # a job that does not upscale never fetches the weights
    assert second["id"] == "up-lazy" and second["status"] == "succeeded", second
    assert s3_image(stack, "lazy/up.png")[0].size == (128, 128)
    assert host.count("/releases/RealESRGAN_x4plus.pth") == 1
    assert host.count("/releases/RealESRGAN_x2plus.pth") == 0


def test_weights_a_previous_container_downloaded_boot_from_the_hub_cache_offline(
    stack, tmp_path, klein_folder, weight_urls
):
    # No MODEL_PATH: the snapshot an earlier start downloaded into HF_HOME (a stopped Vast instance
    # keeps its disk), laid out as huggingface_hub keeps it, and no hub to reach.
    repo = tmp_path / "hf" / "hub" / "models--black-forest-labs--FLUX.2-klein-4B"
    commit = "4f1c2a9e" * 5
    snapshot = repo / "snapshots" / commit
    shutil.copytree(klein_folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    send(
        stack,
        {
            "id": "gen-cached",
            "type": "generate",
            "input": {
                "prompts": ["a harbour at dawn"],
                "upload_urls": [_upload(stack, "cached/gen.png")],
                "width": 256,
                "height": 320,
                "num_steps": 2,
            },
        },
    )
    proc = spawn_worker(stack, **production_env(tmp_path, klein_folder, weight_urls, MODEL_PATH=""))
    try:
        (result,) = results(stack, expected=1, wait=5, timeout_s=BOOT_TIMEOUT_S)
    finally:
        stderr = _stop(proc)

    assert result["status"] == "succeeded" and result["model"] == "flux2-klein-4b-bf16", (
        result,
        stderr[-3000:],
    )
    image, _, _ = s3_image(stack, "cached/gen.png")
    assert image.size == (256, 320)
    lines = log_lines(stderr)
    assert any("from hub black-forest-labs/FLUX.2-klein-4B" in line["msg"] for line in lines)
    # The snapshot, found on disk before torch was imported, was read ahead of the load.
    assert any(line["msg"].endswith(f"of weights from {snapshot} ahead of the load") for line in lines)
    (ready,) = [line for line in lines if line.get("event") == "ready"]
    assert ready["boot"]["prefetch_gb"] > 0


def test_upscale_weights_that_answer_404_fail_the_job_once_naming_the_setting(
    stack, tmp_path, klein_folder, weight_urls, weights_host
):
    missing = weights_host.url + "/status/404/RealESRGAN_x4plus.pth"
    send(
        stack,
        {
            "id": "up-404",
            "type": "upscale",
            "input": {
                "image_url": _input_image(stack, "w404/in.png", (32, 32)),
                "upload_url": _upload(stack, "w404/up.png"),
                "scale": 4,
            },
        },
    )
    env = production_env(
        tmp_path, klein_folder, weight_urls, PRELOAD_MODELS="false", UPSCALER_WEIGHTS_X4=missing
    )
    proc = spawn_worker(stack, **env)
    try:
        (result,) = results(stack, expected=1, wait=5, timeout_s=BOOT_TIMEOUT_S)
    finally:
        _stop(proc)

    assert result["status"] == "failed" and result["attempt"] == 1  # permanent: not retried
    assert result["error"]["code"] == "download_failed"
    assert "UPSCALER_WEIGHTS_X4" in result["error"]["message"] and "HTTP 404" in result["error"]["message"]
    assert queue_counts(stack) == (0, 0)


def test_fetch_weights_fills_the_cache_once_as_the_image_build_does(tmp_path, weight_urls):
    # The Dockerfile's BAKE_UPSCALER_WEIGHTS runs this command; a worker with the same HF_HOME
    # then finds the files (the cache test above shows a cached file is not fetched again).
    host = ScriptedServer()
    try:
        urls = serve_checkpoints(host)
        env = {
            **os.environ,
            "HF_HOME": str(tmp_path / "hf"),
            "UPSCALER_WEIGHTS_X2": urls[2],
            "UPSCALER_WEIGHTS_X4": urls[4],
        }
        for _ in range(2):
            done = _fetch_weights(env)
            assert done.returncode == 0, done.stderr
        assert host.count("/releases/RealESRGAN_x2plus.pth") == 1
        assert host.count("/releases/RealESRGAN_x4plus.pth") == 1
        missing = {**env, "UPSCALER_WEIGHTS_X4": host.url + "/status/404/x4.pth"}
        failed = _fetch_weights(missing)
    finally:
        host.close()
    assert failed.returncode == 3
    (line,) = log_lines(failed.stderr)[-1:]
    assert line["msg"].startswith("cannot start: UPSCALER_WEIGHTS_X4: ") and "HTTP 404" in line["msg"]
    cache = tmp_path / "hf" / "klein-worker" / "upscalers"
    assert sorted(p.name.split("-", 1)[1] for p in cache.iterdir()) == [
        "RealESRGAN_x2plus.pth",
        "RealESRGAN_x4plus.pth",
    ]


def _fetch_weights(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "fetch-weights"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT_S,
    )
