"""Every production misconfiguration, tried as an operator would make it, on a CPU: `python -m worker`
exits 3 ("cannot serve") after one log line that says what to fix; no traceback, nothing on stderr
but JSON log lines, no secret in them."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.helpers import spawn_worker
from tests.production import BOOT_TIMEOUT_S, corrupt_copy, log_lines, partial_copy, production_env


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


# The compiled upscaler loads its checkpoints in the boot's warm-up: the same one line.
@pytest.mark.parametrize("compiled", [{}, {"TORCH_COMPILE": "true", "COMPILE_REGIONS": "upscaler"}])
def test_upscaler_weights_that_answer_404_at_boot_are_one_line(
    stack, tmp_path, klein_folder, weight_urls, weights_host, compiled
):
    missing = weights_host.url + "/status/404/RealESRGAN_x2plus.pth"
    env = production_env(tmp_path, klein_folder, weight_urls, UPSCALER_WEIGHTS_X2=missing, **compiled)
    message = _cannot_start(stack, **env)
    assert f"UPSCALER_WEIGHTS_X2: {missing} answered HTTP 404; fix the setting" in message


def test_upscaler_weights_host_answering_503_at_boot_exits_1_to_be_restarted_not_3(
    stack, tmp_path, klein_folder, weight_urls, weights_host
):
    # Exit 3 ends the container (docker/entrypoint.sh) and the fleet avoids the machine: a weights
    # host that is down for a moment must not do that. Exit 1 is restarted with backoff.
    flaky = weights_host.url + "/status/503/RealESRGAN_x2plus.pth"
    env = production_env(tmp_path, klein_folder, weight_urls, UPSCALER_WEIGHTS_X2=flaky)
    proc = spawn_worker(stack, **env)
    _, stderr = proc.communicate(timeout=BOOT_TIMEOUT_S)
    assert proc.returncode == 1, stderr
    last = log_lines(stderr)[-1]
    assert last["msg"].startswith("cannot start yet: UPSCALER_WEIGHTS_X2:") and "restarted" in last["msg"]
    assert "exc" not in last


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


def test_a_broken_profile_in_the_benchmark_profile_folder_is_one_line(stack, tmp_path):
    # The folder is read at boot, before any model loads: a bad file stops the container with its name.
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "h100-klein-4b-bf16.json").write_text('{"schema_version": 1}')
    message = _cannot_start(stack, MODEL="tiny", BENCHMARK_PROFILE=str(folder))
    assert f"benchmark profile {folder / 'h100-klein-4b-bf16.json'}: created_at: Field required" in message
