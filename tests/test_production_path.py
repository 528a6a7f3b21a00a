"""The deployed code path on a CPU: `python -m worker` with MODEL=klein-4b loading a diffusers
folder (MODEL_PATH), the upscalers fetched from URLs, jobs through moto SQS/S3; and every
production misconfiguration as one log line and exit 3 ("cannot serve")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, queue_counts, results, s3_image, send, spawn_worker
from tests.production import corrupt_copy, log_lines, partial_copy, serve_checkpoints, write_klein_folder
from tests.scripted_http import ScriptedServer, png_bytes

BOOT_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_klein_folder(tmp_path_factory.mktemp("weights") / "FLUX.2-klein-4B")


@pytest.fixture(scope="module")
def weights_host() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def weight_urls(weights_host: ScriptedServer) -> dict[int, str]:
    return serve_checkpoints(weights_host)


def production_env(
    tmp_path: Path, klein_folder: Path, weight_urls: dict[int, str], **env: Any
) -> dict[str, Any]:
    """What an operator sets for a real model, device chosen by the worker (no GPU here: CPU)."""
    return {
        "MODEL": "klein-4b",
        "MODEL_PATH": str(klein_folder),
        "DEVICE": "",
        "UPSCALER_WEIGHTS_X2": weight_urls[2],
        "UPSCALER_WEIGHTS_X4": weight_urls[4],
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "ALLOW_PRIVATE_URLS": "true",
        "RETRY_BACKOFF_SECONDS": "0",
        **env,
    }


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


def test_real_model_folder_generates_and_upscales_with_url_weights(
    stack, tmp_path, klein_folder, weights_host, weight_urls
):
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
    proc = spawn_worker(stack, **production_env(tmp_path, klein_folder, weight_urls))
    try:
        found = {r["id"]: r for r in results(stack, expected=3, wait=5)}
    finally:
        stderr = _stop(proc)

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
    for url in weight_urls.values():
        assert weights_host.count(url[len(weights_host.url) :]) == 1
    cache = tmp_path / "hf" / "klein-worker" / "upscalers"
    cached = sorted(p.name.split("-", 1)[1] for p in cache.iterdir())
    assert cached == ["RealESRGAN_x2plus.pth", "RealESRGAN_x4plus.pth"]
    lines = log_lines(stderr)  # every line is JSON: no traceback, no progress bar
    assert any(line["msg"].startswith("ready: flux2-klein-4b-bf16 on cpu") for line in lines)


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
            (first,) = results(stack, expected=1, wait=5)
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
            (second,) = results(stack, expected=1, wait=5)
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
        (result,) = results(stack, expected=1, wait=5)
    finally:
        _stop(proc)

    assert result["status"] == "failed" and result["attempt"] == 1  # permanent: not retried
    assert result["error"]["code"] == "download_failed"
    assert "UPSCALER_WEIGHTS_X4" in result["error"]["message"] and "HTTP 404" in result["error"]["message"]
    assert queue_counts(stack) == (0, 0)


def _cannot_start(stack, **env: Any) -> str:
    """Run the worker, expect exit 3 ending in one "cannot start" line (no traceback, nothing but
    JSON log lines on stderr); return that line's message."""
    proc = spawn_worker(stack, **env)
    _, stderr = proc.communicate(timeout=BOOT_TIMEOUT_S)
    assert proc.returncode == 3, stderr
    lines = log_lines(stderr)
    assert [line["msg"].startswith("cannot start: ") for line in lines].count(True) == 1, stderr
    last = lines[-1]
    assert last["level"] == "error" and last["msg"].startswith("cannot start: "), stderr
    assert "\n" not in last["msg"] and "exc" not in last
    return str(last["msg"])


def test_a_missing_model_path_is_one_line(stack, tmp_path, klein_folder, weight_urls):
    env = production_env(tmp_path, klein_folder, weight_urls, MODEL_PATH=str(tmp_path / "nowhere"))
    message = _cannot_start(stack, **env)
    assert f"MODEL_PATH={tmp_path / 'nowhere'} is not a folder" in message


def test_a_folder_that_is_not_a_diffusers_folder_is_one_line(stack, tmp_path, klein_folder, weight_urls):
    (tmp_path / "empty").mkdir()
    env = production_env(
        tmp_path, klein_folder, weight_urls, MODEL_PATH=str(tmp_path / "empty"), PRELOAD_MODELS="false"
    )
    message = _cannot_start(stack, **env)
    assert "has no model_index.json" in message


@pytest.mark.parametrize("damage", [partial_copy, corrupt_copy], ids=["partial", "corrupt"])
def test_a_partial_or_corrupt_weights_folder_is_one_line(stack, tmp_path, klein_folder, weight_urls, damage):
    folder = damage(klein_folder, tmp_path / "damaged")
    message = _cannot_start(
        stack, **production_env(tmp_path, klein_folder, weight_urls, MODEL_PATH=str(folder))
    )
    assert f"MODEL_PATH={folder} could not be loaded" in message and "download it again" in message


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MODEL", "klein-5b", "MODEL=klein-5b: Input should be 'auto', 'klein-4b', 'klein-9b' or 'tiny'"),
        ("MAX_BATCH", "0", "MAX_BATCH=0: Input should be greater than or equal to 1"),
        ("QUANTIZATION", "fp4", "QUANTIZATION=fp4: Input should be"),
    ],
)
def test_an_invalid_setting_is_one_line_naming_it(stack, name, value, expected):
    assert expected in _cannot_start(stack, **{name: value})


def test_upscaler_weights_that_answer_404_at_boot_are_one_line(
    stack, tmp_path, klein_folder, weight_urls, weights_host
):
    missing = weights_host.url + "/status/404/RealESRGAN_x2plus.pth"
    env = production_env(tmp_path, klein_folder, weight_urls, UPSCALER_WEIGHTS_X2=missing)
    message = _cannot_start(stack, **env)
    assert f"UPSCALER_WEIGHTS_X2: {missing} answered HTTP 404; fix the setting" in message


def test_a_missing_upscaler_weights_file_is_one_line(stack, tmp_path, klein_folder, weight_urls):
    env = production_env(tmp_path, klein_folder, weight_urls, UPSCALER_WEIGHTS_X4=str(tmp_path / "x4.pth"))
    message = _cannot_start(stack, **env)
    assert f"UPSCALER_WEIGHTS_X4: weights file not found: {tmp_path / 'x4.pth'}" in message


def test_hub_weights_that_cannot_be_fetched_name_the_token_and_the_license(
    stack, tmp_path, klein_folder, weight_urls
):
    # No MODEL_PATH, an empty cache, the hub out of reach (offline here; gated without a token
    # on a connected box): the line says which repo, to set HF_TOKEN, and where to accept.
    env = production_env(tmp_path, klein_folder, weight_urls, MODEL_PATH="")
    message = _cannot_start(stack, **env)
    assert "black-forest-labs/FLUX.2-klein-4B could not be loaded" in message
    assert "set HF_TOKEN" in message and "https://huggingface.co/black-forest-labs/FLUX.2-klein-4B" in message


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
            done = subprocess.run(
                [sys.executable, "-m", "worker", "fetch-weights"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=BOOT_TIMEOUT_S,
            )
            assert done.returncode == 0, done.stderr
        assert host.count("/releases/RealESRGAN_x2plus.pth") == 1
        assert host.count("/releases/RealESRGAN_x4plus.pth") == 1
        missing = {**env, "UPSCALER_WEIGHTS_X4": host.url + "/status/404/x4.pth"}
        failed = subprocess.run(
            [sys.executable, "-m", "worker", "fetch-weights"],
            cwd=ROOT,
            env=missing,
            capture_output=True,
            text=True,
            timeout=BOOT_TIMEOUT_S,
        )
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


class _GatedHub:
    """A loopback stand-in for huggingface.co (HF_ENDPOINT) that answers every request the way
    the hub answers for a gated repository whose license the token's account has not accepted."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _gated(self) -> None:
                hub.authorizations.append(self.headers.get("Authorization"))
                body = b'{"error": "Access to model black-forest-labs/FLUX.2-klein-4B is restricted."}'
                self.send_response(403)
                self.send_header("X-Error-Code", "GatedRepo")
                self.send_header("X-Error-Message", "Access to model is restricted.")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _gated

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_a_token_without_access_to_the_gated_weights_is_one_line_and_never_logged(
    stack, tmp_path, klein_folder, weight_urls
):
    hub = _GatedHub()
    token = "hf_" + "k" * 34
    try:
        env = production_env(
            tmp_path, klein_folder, weight_urls, MODEL_PATH="", HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url
        )
        proc = spawn_worker(stack, **env, HF_TOKEN=token)
        _, stderr = proc.communicate(timeout=BOOT_TIMEOUT_S)
    finally:
        hub.close()
    assert proc.returncode == 3, stderr
    assert f"Bearer {token}" in hub.authorizations  # the token was offered to the hub ...
    assert token not in stderr  # ... and never written to the log
    last = log_lines(stderr)[-1]
    assert last["msg"].startswith("cannot start: ") and "black-forest-labs/FLUX.2-klein-4B" in last["msg"]
    assert "check that HF_TOKEN belongs to an account that accepted the license" in last["msg"]
