"""Per-job LoRA adapters through the real worker: adapter files in moto S3 behind presigned GETs,
jobs on moto SQS, images compared pixel for pixel."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from handlers.errors import DownloadFailed, InvalidInput
from handlers.lora_files import LoraFiles
from tests.helpers import results, run_worker, s3_image, send
from tests.lora_files import make_adapter, wrong_size_adapter, wrong_target_adapter


@pytest.fixture(scope="module")
def lora_engines(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny worker of its own (adapters get loaded into its transformer), cache in a temp folder."""
    from worker.boot import build_engines
    from worker.config import Settings
    from worker.variant import Variant

    home = tmp_path_factory.mktemp("hf-home")
    settings = Settings(model="tiny", device="cpu", hf_home=str(home))
    return build_engines(settings, Variant("tiny", "none", "cpu", "tests"))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("adapters")
    return {
        "style-a": make_adapter(folder, seed=1),
        "style-b": make_adapter(folder, seed=2, rank=8, alpha=8),
        "corrupt": b"\x00\x01 this is not a safetensors file" * 10,
        "wrong-target": wrong_target_adapter(folder),
        "wrong-size": wrong_size_adapter(folder),
        "wrong-size-q": wrong_size_adapter(folder, "to_q"),  # a part of the fused q/k/v
    }


def _serve(stack: Any, name: str, data: bytes) -> str:
    key = f"loras/{name}.safetensors"
    stack.client("s3").put_object(Bucket=stack.bucket, Key=key, Body=data)
    return stack.presign_get(key)


def _job(stack: Any, job_id: str, loras: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    inp: dict[str, Any] = {
        "prompts": ["a lighthouse at dusk"],
        "upload_urls": [stack.presign_put(f"out/{job_id}.png", "image/png")],
        "width": 256,
        "height": 256,
        "seed": 11,
    }
    if loras is not None:
        inp["loras"] = loras
    return {"id": job_id, "type": "generate", "input": inp}


def _pixels(stack: Any, job_id: str) -> np.ndarray:
    return np.asarray(s3_image(stack, f"out/{job_id}.png")[0], dtype=np.int16)


def _run_in_order(stack: Any, engines: Any, jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One job at a time, in order: 'the job after a LoRA job' must really come after it."""
    for job in jobs:
        send(stack, job)
        assert run_worker(stack, engines, job_concurrency=1) == 1
    return {r["id"]: r for r in results(stack, expected=len(jobs))}


def test_adapter_changes_the_image_scale_zero_does_not_and_the_next_job_is_clean(
    stack, engines, lora_engines, adapters
):
    style = _serve(stack, "style-a", adapters["style-a"])
    jobs = [
        _job(stack, "before"),
        _job(stack, "styled", [{"url": style, "scale": 0.8}]),
        _job(stack, "scale-zero", [{"url": style, "scale": 0}]),
        _job(stack, "after"),
    ]
    by_id = _run_in_order(stack, lora_engines, jobs)
    assert {r["status"] for r in by_id.values()} == {"succeeded"}
    # A worker that never saw an adapter (the session's engines), same job.
    send(stack, _job(stack, "clean"))
    assert run_worker(stack, engines) == 1
    assert results(stack, expected=1)[0]["status"] == "succeeded"

    before, styled, zero, after, clean = (
        _pixels(stack, i) for i in ("before", "styled", "scale-zero", "after", "clean")
    )
    assert np.abs(styled - before).mean() > 2  # the adapter visibly changes the image
    assert np.array_equal(zero, before)  # scale 0 is no adapter
    assert np.array_equal(after, before)  # nothing left behind by the LoRA job...
    assert np.array_equal(after, clean)  # ...bit-identical to a worker that never loaded one


def test_two_adapters_in_a_row_and_together(stack, lora_engines, adapters):
    a = _serve(stack, "style-a", adapters["style-a"])
    b = _serve(stack, "style-b", adapters["style-b"])
    jobs = [
        _job(stack, "a", [{"url": a}]),
        _job(stack, "b", [{"url": b}]),
        _job(stack, "a-again", [{"url": a}]),  # cached on disk and still loaded
        _job(stack, "both", [{"url": a, "scale": 0.5}, {"url": b, "scale": -0.5}]),
        _job(stack, "none"),
    ]
    by_id = _run_in_order(stack, lora_engines, jobs)
    assert {r["status"] for r in by_id.values()} == {"succeeded"}
    img = {i: _pixels(stack, i) for i in ("a", "b", "a-again", "both", "none")}
    assert np.abs(img["a"] - img["b"]).mean() > 2
    assert np.array_equal(img["a"], img["a-again"])  # the second adapter did not linger
    assert np.abs(img["both"] - img["a"]).mean() > 1 and np.abs(img["both"] - img["b"]).mean() > 1
    for styled in ("a", "b", "both"):
        assert not np.array_equal(img[styled], img["none"])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("corrupt", "not a LoRA safetensors file"),
        ("wrong-target", "match no layer of this transformer"),
        ("wrong-size", "a LoRA for another model size"),
        ("wrong-size-q", "layer 'transformer_blocks.0.attn.to_q' is 32->32 here"),
    ],
)
def test_a_bad_adapter_file_is_invalid_input_naming_it(stack, lora_engines, adapters, name, message):
    good = _serve(stack, "style-a", adapters["style-a"])
    bad = _serve(stack, name, adapters[name])
    jobs = [
        _job(stack, "plain"),
        _job(stack, "bad", [{"url": good}, {"url": bad}]),
        _job(stack, "plain-after"),
    ]
    by_id = _run_in_order(stack, lora_engines, jobs)
    result = by_id["bad"]
    assert result["status"] == "failed" and result["attempt"] == 1  # permanent: not retried
    assert result["error"]["code"] == "invalid_input"
    assert result["error"]["message"].startswith("input.loras[1]")
    assert message in result["error"]["message"]
    assert "X-Amz-Signature" not in result["error"]["message"]
    # The worker goes on, clean: the good adapter of the failed job was never left active.
    assert by_id["plain-after"]["status"] == "succeeded"
    assert np.array_equal(_pixels(stack, "plain-after"), _pixels(stack, "plain"))


def test_an_oversize_adapter_is_refused_before_it_is_stored(stack, lora_engines, adapters, tmp_path):
    small = dataclasses.replace(
        lora_engines, lora_files=LoraFiles(directory=tmp_path, budget_bytes=10**9, max_file_bytes=1000)
    )
    url = _serve(stack, "style-a", adapters["style-a"])
    by_id = _run_in_order(stack, small, [_job(stack, "big", [{"url": url}])])
    error = by_id["big"]["error"]
    assert error["code"] == "invalid_input"
    assert error["message"].startswith("input.loras[0].url:") and "MAX_LORA_BYTES" in error["message"]
    assert list(tmp_path.glob("*.safetensors")) == []


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ([{"url": "https://x/a.safetensors"}] * 3, "at most 2 LoRA adapters per job (MAX_LORAS)"),
        ([{"url": "https://x/a.safetensors", "scale": 2.5}], "input.loras.0.scale"),
        ([{"url": "https://x/a.safetensors", "repo": "o/n"}], 'either "url" or "repo"'),
        ([{"repo": "not a repo"}], "input.loras.0.repo"),
        ([{"url": "file:///etc/passwd"}], "input.loras.0.url"),
        ([{"repo": "owner/name", "weight_name": "../x.safetensors"}], "input.loras.0.weight_name"),
    ],
)
def test_lora_fields_are_validated(stack, lora_engines, loras, message):
    by_id = _run_in_order(stack, lora_engines, [_job(stack, "v", loras)])
    error = by_id["v"]["error"]
    assert error["code"] == "invalid_input" and message in error["message"]


def test_a_hub_adapter_on_a_worker_without_hub_access_is_a_clear_error(stack, lora_engines):
    send(stack, _job(stack, "hub", [{"repo": "owner/style", "weight_name": "style.safetensors"}]))
    assert run_worker(stack, lora_engines, hf_hub_offline=True) == 1
    (result,) = results(stack, expected=1)
    assert result["error"]["code"] == "invalid_input"
    message = result["error"]["message"]
    assert message.startswith("input.loras[0].repo: this worker has no Hugging Face hub access")


def test_adapter_files_are_kept_by_content_hash_under_a_byte_budget(tmp_path: Path) -> None:
    files = LoraFiles(directory=tmp_path, budget_bytes=250, max_file_bytes=1000)
    first, _ = files.store(b"a" * 100)
    again, path = files.store(b"a" * 100)  # same content, same file
    assert first == again and path.read_bytes() == b"a" * 100
    files.store(b"b" * 100)
    files.store(b"a" * 100)  # use refreshes: "a" is now the most recent
    files.store(b"c" * 100)  # 300 bytes > 250: the least recently used ("b") goes
    kept = sorted(p.read_bytes()[:1] for p in tmp_path.glob("*.safetensors"))
    assert kept == [b"a", b"c"]


@pytest.fixture
def fake_hub(adapters: dict[str, bytes]) -> Any:
    from tests.fake_hub import FakeHub

    hub = FakeHub({"studio/styles": {"a/style.safetensors": adapters["style-a"]}})
    yield hub
    hub.close()


def test_a_hub_adapter_is_fetched_with_its_size_checked_first(fake_hub, lora_engines, adapters, tmp_path):
    from handlers.schemas import LoraRef
    from worker.hub_files import HubFiles
    from worker.transfer import TransferClient

    transfer = TransferClient(hub=HubFiles(endpoint=fake_hub.url, cache_dir=str(tmp_path / "hub")))
    files = LoraFiles(directory=tmp_path / "loras", budget_bytes=10**9, max_file_bytes=10**7)
    ref = LoraRef(repo="studio/styles", weight_name="a/style.safetensors", scale=0.8)
    (got,) = files.fetch([ref], transfer=transfer)
    assert got.path.read_bytes() == adapters["style-a"] and got.scale == 0.8
    assert (
        got.sha256
        == LoraFiles(directory=tmp_path / "again", budget_bytes=1, max_file_bytes=1).store(
            adapters["style-a"]
        )[0]
    )

    missing = LoraRef(repo="studio/styles", weight_name="b.safetensors")
    with pytest.raises(InvalidInput, match=r"^input\.loras\[0\]\.weight_name: studio/styles has no file"):
        files.fetch([missing], transfer=transfer)
    with pytest.raises(
        DownloadFailed, match=r"^input\.loras\[0\]: nobody/none/x\.safetensors not found"
    ) as err:
        files.fetch([LoraRef(repo="nobody/none", weight_name="x.safetensors")], transfer=transfer)
    assert not err.value.retryable
    small = LoraFiles(directory=tmp_path / "small", budget_bytes=10**9, max_file_bytes=100)
    fake_hub.requests.clear()
    with pytest.raises(InvalidInput, match="MAX_LORA_BYTES"):
        small.fetch([ref], transfer=transfer)
    assert [method for method, _ in fake_hub.requests] == ["POST"]  # refused from the listing
