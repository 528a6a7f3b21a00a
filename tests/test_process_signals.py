"""The worker as a real process: SIGKILL and SIGTERM mid-job lose nothing; logs carry no secrets."""

from __future__ import annotations

import signal
import time

import pytest

from tests.helpers import queue_counts, results, run_worker, s3_image, send, spawn_worker


def _slow_job(stack, scripted, job_id, seconds):
    return {
        "id": job_id,
        "type": "upscale",
        "input": {
            "image_url": f"{scripted.url}/slow/{seconds}/in.png",
            "upload_url": stack.presign_put(f"{job_id}.png", "image/png"),
            "scale": 2,
        },
    }


def _wait_for_request(scripted, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scripted.hit.wait(0.2):
            return
        if proc.poll() is not None:
            pytest.fail("worker exited early:\n" + proc.stderr.read())
    proc.kill()
    pytest.fail("worker never started the job")


def test_sigkill_mid_job_the_message_comes_back_and_finishes(stack, engines, scripted):
    send(stack, _slow_job(stack, scripted, "killed", 30))
    proc = spawn_worker(stack, VISIBILITY_TIMEOUT=5)
    _wait_for_request(scripted, proc)

    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    assert results(stack, wait=0) == []  # nothing was reported by the dead worker
    # The visibility timeout lapses: the job is visible again (waited for, not slept past).
    deadline = time.monotonic() + 60
    while queue_counts(stack)[0] != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert queue_counts(stack)[0] == 1
    scripted.delay_override = 0  # the input server answers at once now
    run_worker(stack, engines, visibility_timeout=30)
    (result,) = results(stack, expected=1)
    assert result["id"] == "killed"
    assert result["status"] == "succeeded" and result["attempt"] == 2
    assert s3_image(stack, "killed.png")[0].size == (128, 128)
    assert queue_counts(stack) == (0, 0)


def test_sigterm_mid_job_finishes_the_job_and_exits_zero(stack, scripted):
    send(stack, _slow_job(stack, scripted, "drained", 3))
    proc = spawn_worker(stack, SHUTDOWN_GRACE_SECONDS=25)
    _wait_for_request(scripted, proc)

    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 0, stderr
    (result,) = results(stack, expected=1)
    assert result["id"] == "drained" and result["status"] == "succeeded"
    assert s3_image(stack, "drained.png")[0].size == (128, 128)
    assert queue_counts(stack) == (0, 0)
    assert "X-Amz-Signature=" not in stderr and "X-Amz-Credential=" not in stderr


def test_sigterm_past_grace_releases_the_job_at_once_and_exits_zero(stack, engines, scripted):
    send(stack, _slow_job(stack, scripted, "released", 20))
    proc = spawn_worker(stack, SHUTDOWN_GRACE_SECONDS=1, VISIBILITY_TIMEOUT=300)
    _wait_for_request(scripted, proc)

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)

    assert proc.returncode == 0, stderr
    assert time.monotonic() - started < 15
    assert results(stack, wait=0) == []
    # Visible again at once, not after the 300 s visibility timeout.
    assert queue_counts(stack)[0] == 1
    assert "X-Amz-Signature=" not in stderr
    # Point the slow path at an instant reply and let a fresh worker finish the job.
    scripted.delay_override = 0
    run_worker(stack, engines)
    (result,) = results(stack, expected=1)
    assert result["id"] == "released" and result["status"] == "succeeded" and result["attempt"] == 2


def test_idle_worker_exits_and_destroys_its_own_vast_instance(stack, scripted):
    proc = spawn_worker(
        stack,
        IDLE_SHUTDOWN_SECONDS=2,
        CONTAINER_ID="4242",
        CONTAINER_API_KEY="instance-key",
        VAST_API_URL=scripted.url,
    )
    _, stderr = proc.communicate(timeout=240)

    assert proc.returncode == 0, stderr
    (call,) = scripted.requests
    method, path, headers, _ = call
    assert (method, path) == ("DELETE", "/api/v0/instances/4242/")
    assert headers["Authorization"] == "Bearer instance-key"
    assert "instance-key" not in stderr


def test_a_machine_that_cannot_serve_fails_at_boot_with_a_clear_message(stack):
    proc = spawn_worker(stack, MODEL="auto", DEVICE="", LOG_FORMAT="json")
    _, stderr = proc.communicate(timeout=240)

    assert proc.returncode == 3
    assert "cannot start" in stderr and "no NVIDIA GPU" in stderr and "MODEL=tiny" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("preload", ["true", "false"])
def test_a_missing_quantization_backend_is_a_boot_error_either_way(stack, preload):
    # nunchaku is never installed in the test environment (the PyPI package of that name is another
    # project); with PRELOAD_MODELS=false the check still runs at boot, not in the first job.
    proc = spawn_worker(stack, MODEL="klein-4b", QUANTIZATION="nunchaku-int4", PRELOAD_MODELS=preload)
    _, stderr = proc.communicate(timeout=240)

    assert proc.returncode == 3, stderr
    assert "cannot start" in stderr and "nunchaku is not installed" in stderr
    assert "Traceback" not in stderr
