"""Model choice at boot: from fake NVML readings and from benchmark profiles, every branch."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from klein_facts.profile import BenchmarkProfile
from klein_facts.variants import GIB
from tests.helpers import results, send, spawn_worker
from tests.production import BOOT_TIMEOUT_S
from tests.scripted_http import png_bytes
from worker.app import limits_for
from worker.boot_error import BootError
from worker.config import Settings
from worker.gpu import GpuInfo
from worker.variant import choose_variant, read_profile


def gpu(name: str, total_gib: float, free_gib: float, cc: tuple[int, int] = (8, 9)) -> GpuInfo:
    return GpuInfo(0, name, int(total_gib * GIB), int(free_gib * GIB), "570.1", "12.8", cc)


def settings(**kw) -> Settings:
    return Settings(**kw)


@pytest.mark.parametrize(
    ("card", "allow_9b", "expected"),
    [
        (gpu("NVIDIA H100 80GB HBM3", 80, 79, (9, 0)), True, ("klein-9b", "fp8")),
        (gpu("NVIDIA H100 80GB HBM3", 80, 79, (9, 0)), False, ("klein-4b", "none")),
        (gpu("NVIDIA GeForce RTX 5090", 32, 31, (12, 0)), True, ("klein-9b", "fp8")),
        (gpu("NVIDIA GeForce RTX 4090", 24, 23.5), True, ("klein-4b", "none")),
        (gpu("NVIDIA GeForce RTX 4080", 16, 15.6), False, ("klein-4b", "fp8")),
        (gpu("NVIDIA RTX A4000", 16, 15.6, (8, 6)), False, ("klein-4b", "fp8")),
    ],
    ids=["h100-9b-allowed", "h100-commercial", "5090-9b", "4090", "4080-fp8", "a4000-weight-only-fp8"],
)
def test_auto_picks_the_best_variant_the_free_memory_holds(card, allow_9b, expected):
    variant = choose_variant(settings(model="auto", allow_non_commercial=allow_9b), [card])
    assert (variant.model, variant.quantization) == expected
    assert variant.device == "cuda" and card.name in variant.reason


def test_auto_refuses_a_card_that_holds_nothing_and_says_what_it_needs():
    with pytest.raises(BootError) as err:
        choose_variant(settings(model="auto"), [gpu("NVIDIA GeForce RTX 3060", 12, 10.5, (8, 6))])
    message = str(err.value)
    assert "RTX 3060" in message and "10.5 GiB free" in message and "needs 12 GiB" in message


def test_auto_counts_free_not_total_memory():
    busy_4090 = gpu("NVIDIA GeForce RTX 4090", 24, 14)  # someone else holds 10 GiB
    assert choose_variant(settings(model="auto"), [busy_4090]).quantization == "fp8"


def test_quantization_setting_restricts_auto():
    with pytest.raises(BootError):
        choose_variant(settings(model="auto", quantization="fp8"), [gpu("RTX 3060", 12, 11)])
    h100 = gpu("H100", 80, 79, (9, 0))
    assert choose_variant(settings(model="auto", quantization="fp8"), [h100]).model == "klein-4b"


def test_explicit_model_and_no_gpu_cases():
    assert choose_variant(settings(model="klein-9b"), [gpu("H100", 80, 79)]).quantization == "fp8"
    assert choose_variant(settings(model="klein-4b", quantization="int8"), [gpu("L4", 24, 23)]).label == (
        "flux2-klein-4b-int8"
    )
    tiny = choose_variant(settings(model="tiny"), [])
    assert (tiny.device, tiny.quantization) == ("cpu", "none")  # auto: random weights, full precision
    # A quantization named is served on the tiny model too (the quantized path, on a CPU).
    assert choose_variant(settings(model="tiny", quantization="fp8"), []).quantization == "fp8"
    with pytest.raises(BootError, match="MODEL=tiny"):
        choose_variant(settings(model="auto"), [])


def _profile(
    *, fits: bool, model: str | None, quant: str | None, refs: int | None, batch: int | None
) -> dict:
    return {
        "schema_version": 1,
        "created_at": datetime.now(UTC).isoformat(),
        "gpu": {"name": "NVIDIA GeForce RTX 4090", "total_bytes": 24 * GIB},
        "software": {"python": "3.11", "torch": "2.14.1", "diffusers": "0.42.1"},
        "variant": {
            "model": "klein-4b",
            "quantization": "none",
            "label": "flux2-klein-4b-bf16",
            "device": "cuda",
        },
        "settings": {"steps": 4, "runs": 3, "reference_side": 1024},
        "limits": {"max_references_default": refs, "max_batch": batch},
        "recommendation": {"fits": fits, "model": model, "quantization": quant, "reason": "measured"},
    }


def _write(tmp_path, data) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    BenchmarkProfile.model_validate(data)
    return str(path)


def test_profile_recommendation_drives_auto_and_limits(tmp_path):
    path = _write(tmp_path, _profile(fits=True, model="klein-4b", quant="none", refs=12, batch=4))
    s = settings(model="auto", benchmark_profile=path)
    variant = choose_variant(s, [gpu("NVIDIA GeForce RTX 4090", 24, 23)], read_profile(s))
    assert (variant.model, variant.quantization) == ("klein-4b", "none")
    assert "benchmark profile" in variant.reason
    limits = limits_for(s)
    assert (limits.max_references, limits.max_batch) == (12, 4)
    # Explicit settings win over the profile.
    explicit = limits_for(settings(benchmark_profile=path, max_references=3, max_batch=6))
    assert (explicit.max_references, explicit.max_batch) == (3, 6)


def test_profile_that_does_not_fit_refuses_to_boot(tmp_path):
    path = _write(tmp_path, _profile(fits=False, model=None, quant=None, refs=None, batch=None))
    s = settings(model="auto", benchmark_profile=path)
    with pytest.raises(BootError, match="no klein variant fits"):
        choose_variant(s, [gpu("NVIDIA GeForce RTX 4090", 24, 23)], read_profile(s))
    assert limits_for(s).max_references == 10  # an unusable profile gives no limits


def test_profile_recommending_9b_needs_the_non_commercial_opt_in(tmp_path):
    path = _write(tmp_path, _profile(fits=True, model="klein-9b", quant="fp8", refs=6, batch=2))
    card = [gpu("NVIDIA GeForce RTX 4090", 24, 23)]
    s = settings(model="auto", benchmark_profile=path)
    with pytest.raises(BootError, match="ALLOW_NON_COMMERCIAL"):
        choose_variant(s, card, read_profile(s))
    allowed = settings(model="auto", benchmark_profile=path, allow_non_commercial=True)
    assert choose_variant(allowed, card, read_profile(allowed)).model == "klein-9b"


def test_unreadable_profile_is_a_boot_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1}')
    with pytest.raises(BootError, match="bad.json"):
        read_profile(settings(benchmark_profile=str(bad)))


PROFILES = Path(__file__).resolve().parent.parent / "benchmarks" / "profiles"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("h100-klein-4b-bf16.json", ("klein-4b", "none")), ("h100-klein-9b-fp8.json", ("klein-9b", "fp8"))],
)
def test_committed_h100_profiles_drive_the_worker(name, expected):
    # The profiles measured on a lent H100 are what an operator mounts as BENCHMARK_PROFILE:
    # they must validate, pick their own variant and give the measured limits.
    path = str(PROFILES / name)
    s = settings(model="auto", benchmark_profile=path, allow_non_commercial=True)
    profile = read_profile(s)
    assert profile is not None and profile.gpu is not None and "H100" in profile.gpu.name
    assert profile.variant.random_weights and profile.rest_vram is not None
    variant = choose_variant(s, [gpu("NVIDIA H100 80GB HBM3", 80, 79, (9, 0))], profile)
    assert (variant.model, variant.quantization) == expected
    limits = limits_for(s)
    assert limits.max_references == profile.limits.max_references_default == 16
    assert limits.max_batch == min(Settings().max_batch, profile.limits.max_batch)


def test_aws_region_comes_from_the_queue_url_when_unset(monkeypatch):
    from worker.config import Settings

    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    aws = Settings(queue_url="https://sqs.eu-west-1.amazonaws.com/123456789012/jobs")
    assert aws.aws_region == "eu-west-1"
    assert Settings(queue_url="http://127.0.0.1:9324/000000000000/jobs").aws_region == "us-east-1"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")  # an explicit region always wins
    assert Settings(queue_url="https://sqs.eu-west-1.amazonaws.com/1/jobs").aws_region == "ap-south-1"


def test_upscaler_defaults_are_the_pinned_official_files_and_empty_disables_a_scale(monkeypatch):
    from handlers.engines.weights import PINNED_SHA256
    from worker.config import Settings

    defaults = Settings()
    assert defaults.upscaler_weights_x2 in PINNED_SHA256 and defaults.upscaler_weights_x4 in PINNED_SHA256
    assert defaults.upscaler_weights_x2.endswith("/v0.2.1/RealESRGAN_x2plus.pth")
    monkeypatch.setenv("UPSCALER_WEIGHTS_X2", "")
    assert Settings().upscaler_weights_x2 is None


# ---- a folder of profiles: the worker's own card, the largest model, the quantization that served fastest


def _measured(
    tmp_path: Path,
    name: str,
    *,
    card: str = "NVIDIA H100 80GB HBM3",
    model: str = "klein-9b",
    quant: str = "fp8",
    latency: float | None = 0.9,
    fits: bool = True,
    compiled: bool = False,
    refs: int = 6,
) -> Path:
    data = _profile(
        fits=fits, model=model if fits else None, quant=quant if fits else None, refs=refs, batch=4
    )
    data["gpu"] = {"name": card, "total_bytes": 80 * GIB}
    data["variant"] = {
        "model": model,
        "quantization": quant,
        "label": f"flux2-{model}-{quant}",
        "device": "cuda",
    }
    data["settings"]["compiled"] = compiled
    if latency is not None:
        data["resolutions"] = [{"width": 1024, "height": 1024, "latency_s_median": latency}]
    folder = tmp_path / "profiles"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data))
    return folder


H100 = gpu("NVIDIA H100 80GB HBM3", 80, 79, (9, 0))


def _serve(folder: Path, card: GpuInfo = H100, **kw) -> tuple[tuple[str, str], int]:
    s = settings(benchmark_profile=str(folder), **{"model": "auto", "allow_non_commercial": True, **kw})
    variant = choose_variant(s, [card], read_profile(s, [card]))
    return (variant.model, variant.quantization), limits_for(s, [card]).max_references


def test_profile_folder_serves_the_quantization_that_was_fastest_on_this_card(tmp_path):
    _measured(tmp_path, "h100-9b-fp8", quant="fp8", latency=0.93, refs=16)
    folder = _measured(tmp_path, "h100-9b-bf16", quant="none", latency=0.61, refs=12)
    _measured(tmp_path, "h100-4b-bf16", model="klein-4b", quant="none", latency=0.52, refs=20)
    # The largest model allowed, in its fastest quantization; the limits are that profile's.
    assert _serve(folder) == (("klein-9b", "none"), 12)
    # Without the non-commercial opt-in the 4B profile is the one served.
    assert _serve(folder, allow_non_commercial=False) == (("klein-4b", "none"), 20)
    # A pinned quantization wins over speed.
    assert _serve(folder, quantization="fp8") == (("klein-9b", "fp8"), 16)
    # MODEL pinned, QUANTIZATION=auto: the measured fastest of that model, not the FP8 rule.
    assert _serve(folder, model="klein-9b", allow_non_commercial=False) == (("klein-9b", "none"), 12)


def test_profile_folder_prefers_what_was_measured_as_served_and_skips_what_does_not_fit(tmp_path):
    _measured(tmp_path, "a-eager-fast", quant="none", latency=0.40, compiled=False, refs=3)
    _measured(tmp_path, "b-compiled", quant="fp8", latency=0.45, compiled=True, refs=7)
    folder = _measured(tmp_path, "c-oom", quant="int8", latency=0.10, fits=False, refs=9)
    # TORCH_COMPILE on (the GPU default): the compiled measurement is what this worker would serve.
    assert _serve(folder) == (("klein-9b", "fp8"), 7)
    assert _serve(folder, torch_compile=False) == (("klein-9b", "none"), 3)


def test_profile_folder_of_other_cards_falls_back_to_free_memory(tmp_path):
    folder = _measured(tmp_path, "5090-9b-bf16", card="NVIDIA GeForce RTX 5090", quant="none", latency=0.5)
    assert _serve(folder) == (("klein-9b", "fp8"), 10)  # the VRAM table's choice and default limits


def test_empty_or_broken_profile_folder_is_a_boot_error_naming_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BootError, match="holds no"):
        read_profile(settings(benchmark_profile=str(empty)), [H100])
    folder = _measured(tmp_path, "good")
    (folder / "broken.json").write_text("{")
    with pytest.raises(BootError, match="broken.json"):
        read_profile(settings(benchmark_profile=str(folder)), [H100])


def test_committed_profiles_folder_picks_9b_on_an_h100_when_allowed():
    # benchmarks/profiles/ as a folder: both H100 profiles fit; 9B is the larger model.
    assert _serve(PROFILES)[0] == ("klein-9b", "fp8")
    assert _serve(PROFILES, allow_non_commercial=False)[0] == ("klein-4b", "none")


# ---- the worker process reads BENCHMARK_PROFILE once: the limits it serves with are boot's


def _feed_once(pipe: Path, text: str, stop: threading.Event) -> None:
    """Serve ``text`` to the first process that opens the named pipe ``pipe``; every later reader
    finds it empty (not JSON), so a second read of the profile cannot go unnoticed."""
    fed = False
    while not stop.is_set():
        try:
            # Succeeds only while a reader has the pipe open (a reader's open waits for a writer).
            fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            stop.wait(0.02)
            continue
        if not fed:
            os.write(fd, text.encode())  # well under the pipe's buffer: never blocks
            fed = True
        os.close(fd)  # the reader sees the end of the file (again, if it is the first one still reading)


def test_the_worker_process_reads_its_profile_once_and_serves_with_its_limits(stack, tmp_path):
    pipe = tmp_path / "profile.json"
    os.mkfifo(pipe)
    profile = _profile(fits=True, model="klein-4b", quant="none", refs=1, batch=4)
    stop = threading.Event()
    feeder = threading.Thread(target=_feed_once, args=(pipe, json.dumps(profile), stop), daemon=True)
    feeder.start()
    stack.client("s3").put_object(Bucket=stack.bucket, Key="refs/a.png", Body=png_bytes(64, 64))
    ref = {"url": stack.presign_get("refs/a.png")}
    for job_id, refs in (("one-ref", [ref]), ("two-refs", [ref, ref])):
        job_input = {"prompts": ["a lighthouse"], "width": 256, "height": 256, "images": refs}
        job_input["upload_urls"] = [stack.presign_put(f"once/{job_id}.png", "image/png")]
        send(stack, {"id": job_id, "type": "generate", "input": job_input})
    proc = spawn_worker(stack, BENCHMARK_PROFILE=str(pipe))
    found: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT_S - 60  # inside pytest's own timeout
        while len(found) < 2 and proc.poll() is None and time.monotonic() < deadline:
            found.update((r["id"], r) for r in results(stack, wait=2))
    finally:
        stop.set()
        proc.terminate()
        _, stderr = proc.communicate(timeout=60)
        feeder.join(timeout=10)
    assert set(found) == {"one-ref", "two-refs"}, stderr[-3000:]
    # The limit is the profile's (1 reference, where the default is 10), read once at boot: the
    # runner did not open the profile again (it would have found it empty and refused to start).
    assert found["one-ref"]["status"] == "succeeded", found["one-ref"].get("error")
    refused = found["two-refs"]
    assert refused["status"] == "failed" and refused["error"]["code"] == "invalid_input"
    assert "at most 1 reference images (MAX_REFERENCES), got 2" in refused["error"]["message"]
