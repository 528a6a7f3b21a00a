"""/healthz and /metrics on a worker process running the tiny model against moto."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

from tests.helpers import results, s3_image, send, spawn_worker


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def _wait_for(url: str, predicate, timeout: float = 120) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    status, body = 0, ""
    while time.monotonic() < deadline:
        status, body = _get(url)
        if predicate(status, body):
            return status, body
        time.sleep(0.3)
    raise AssertionError(f"timed out on {url}: last {status} {body}")


def test_healthz_ready_and_metrics_count_jobs(stack):
    port = _free_port()
    proc = spawn_worker(stack, METRICS_PORT=port)
    try:
        base = f"http://127.0.0.1:{port}"
        status, body = _wait_for(f"{base}/healthz", lambda s, b: s == 200)
        health = json.loads(body)
        assert health == {
            "ready": True,
            "booted": True,
            "model_loaded": True,
            "queue_reachable": True,
            "last_poll_age_s": health["last_poll_age_s"],
            "receive_failures": 0,
            "boot": health["boot"],
        }
        # The boot phases, as in the ready log line (the tiny model is not compiled by default).
        assert set(health["boot"]) == {"imports_s", "weights_s", "compile_cache", "warm_up_s"}
        assert health["boot"]["compile_cache"] == "not compiled"
        assert health["boot"]["imports_s"] > 0 and health["boot"]["warm_up_s"] > 0
        stack.client("s3").put_object(Bucket=stack.bucket, Key="m/in.png", Body=_png())
        send(
            stack,
            {
                "id": "metered",
                "type": "upscale",
                "input": {
                    "image_url": stack.presign_get("m/in.png"),
                    "upload_url": stack.presign_put("m/o.png"),
                    "scale": 2,
                },
            },
        )
        send(stack, "not json")
        assert len(results(stack, expected=2)) == 2

        # Results are published before the message is settled and counted: wait for both counts.
        _, metrics = _wait_for(
            f"{base}/metrics", lambda s, b: 'status="failed"' in b and 'status="succeeded"' in b
        )
        assert 'klein_jobs_total{status="succeeded",type="upscale"} 1.0' in metrics
        assert 'klein_jobs_total{status="failed",type="unknown"} 1.0' in metrics
        assert 'klein_stage_duration_seconds_count{stage="upscale"} 1.0' in metrics
        assert "klein_queue_wait_seconds_count 2.0" in metrics
        assert "klein_model_loaded 1.0" in metrics
        assert "klein_model_load_seconds" in metrics
        assert "klein_gpu_memory_used_bytes" in metrics  # the family exists; no GPU rows on CPU
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0


def test_without_preload_the_model_loads_with_the_first_generate_job(stack):
    # PRELOAD_MODELS=false: ready at once, an upscale job never loads klein, a generate job does.
    port = _free_port()
    proc = spawn_worker(stack, METRICS_PORT=port, PRELOAD_MODELS="false")
    base = f"http://127.0.0.1:{port}"
    try:
        _, body = _wait_for(f"{base}/healthz", lambda s, b: s == 200)
        assert json.loads(body)["model_loaded"] is False
        stack.client("s3").put_object(Bucket=stack.bucket, Key="lazy/in.png", Body=_png())
        upscale = {
            "image_url": stack.presign_get("lazy/in.png"),
            "upload_url": stack.presign_put("lazy/up.png"),
        }
        send(stack, {"id": "up", "type": "upscale", "input": {**upscale, "scale": 2}})
        (result,) = results(stack, expected=1)
        assert result["status"] == "succeeded" and result["model"] == "flux2-klein-tiny"
        _, metrics = _get(f"{base}/metrics")
        assert "klein_model_loaded 0.0" in metrics
        assert json.loads(_get(f"{base}/healthz")[1])["model_loaded"] is False

        put = stack.presign_put("lazy/gen.png")
        send(
            stack,
            {
                "id": "gen",
                "type": "generate",
                "input": {"prompts": ["a fox"], "upload_urls": [put], "width": 256, "height": 320},
            },
        )
        (result,) = results(stack, expected=1)
        assert result["status"] == "succeeded"
        assert s3_image(stack, "lazy/gen.png")[0].size == (256, 320)
        _, metrics = _get(f"{base}/metrics")
        assert "klein_model_loaded 1.0" in metrics
        assert json.loads(_get(f"{base}/healthz")[1])["model_loaded"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0
    ready = [json.loads(line) for line in stderr.splitlines() if '"event": "ready"' in line]
    assert [entry["preloaded"] for entry in ready] == [False]


def test_healthz_is_503_while_the_queue_is_unreachable(stack):
    port = _free_port()
    dead = _free_port()  # nothing listens here
    proc = spawn_worker(
        stack,
        METRICS_PORT=port,
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{dead}",
        QUEUE_URL=f"http://127.0.0.1:{dead}/123456789012/nowhere",
    )
    try:
        # Once the model is loaded the only thing missing is the queue.
        status, body = _wait_for(
            f"http://127.0.0.1:{port}/healthz", lambda s, b: s == 503 and json.loads(b)["model_loaded"]
        )
        detail = json.loads(body)
        assert detail["ready"] is False and detail["queue_reachable"] is False
        assert proc.poll() is None  # a queue outage does not kill the worker
        # The retry after the first 2 s pause fails too (waited for, not slept past).
        _wait_for(
            f"http://127.0.0.1:{port}/healthz",
            lambda s, b: s == 503 and json.loads(b)["receive_failures"] >= 2,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0
    failures = [json.loads(line) for line in stderr.splitlines() if '"receive failed' in line]
    assert [entry["msg"].split(" (")[1].split(" ")[0] for entry in failures[:2]] == ["1", "2"]
    assert "Could not connect" in failures[1]["msg"]  # each retry names the cause in one line
    assert ["exc" in entry for entry in failures] == [True] + [False] * (len(failures) - 1)


class _Cable:
    """A loopback TCP forwarder to the moto server that can be unplugged and plugged back in on
    the same port: a queue outage as the worker sees it (connections refused, then answered)."""

    def __init__(self, target: str) -> None:
        host, port = target.split("://", 1)[1].split(":")
        self.target = (host, int(port))
        self.port = _free_port()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def plug(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def unplug(self) -> None:
        for sock in [self._listener, *self._sockets]:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._listener, self._sockets = None, []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_healthz_turns_503_on_the_first_failed_receive_of_an_outage_and_back(stack):
    port = _free_port()
    cable = _Cable(stack.endpoint)
    cable.plug()
    proc = spawn_worker(stack, METRICS_PORT=port, AWS_ENDPOINT_URL=f"http://127.0.0.1:{cable.port}")
    healthz = f"http://127.0.0.1:{port}/healthz"
    try:
        _wait_for(healthz, lambda s, b: s == 200)
        cable.unplug()
        # Well inside the 90 s "last success" window: the failed receive itself is what counts.
        _, body = _wait_for(healthz, lambda s, b: s == 503, timeout=60)
        detail = json.loads(body)
        assert detail["queue_reachable"] is False and detail["receive_failures"] >= 1
        assert detail["last_poll_age_s"] < 90
        cable.plug()
        _, body = _wait_for(healthz, lambda s, b: s == 200, timeout=90)
        assert json.loads(body)["receive_failures"] == 0
    finally:
        cable.unplug()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def _png() -> bytes:
    from tests.scripted_http import png_bytes

    return png_bytes(48, 32)
