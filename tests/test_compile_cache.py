"""COMPILE_CACHE: a compiled engine is built once per setup, then loaded by every later boot.

The end-to-end test runs real worker processes with TORCH_COMPILE=true on the CPU (inductor's C++
backend) at the smallest compiled size, through a folder and an S3 bucket on the moto server. The
other tests check the bundle and the stores in-process, without compiling anything.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import s3_image, serve_jobs
from worker.compile_store import FolderStore, S3Store, fetch, open_stores
from worker.local import LocalStack

COMPILED = "256x256"  # the smallest size a job may ask for: CPU compiles are slow


def _job(stack: LocalStack, job_id: str, width: int, height: int) -> dict[str, Any]:
    return {
        "id": job_id,
        "type": "generate",
        "input": {
            "prompts": ["a lighthouse"],
            "upload_urls": [stack.presign_put(f"{job_id}.png", "image/png")],
            "width": width,
            "height": height,
            "seed": 7,
        },
    }


def _boot_once(
    stack: LocalStack, job_ids: list[str], cache: str, widths: list[int], **env: str
) -> tuple[dict[str, Any], dict[str, dict]]:
    """One worker process: it boots, serves a job per id, is stopped. Returns its boot phases and
    the results by id."""
    jobs = [_job(stack, job_id, width, 256) for job_id, width in zip(job_ids, widths, strict=True)]
    return serve_jobs(stack, jobs, TORCH_COMPILE="true", COMPILE_CACHE=cache, COMPILE_SIZES=COMPILED, **env)


def _pixels(stack: LocalStack, key: str) -> np.ndarray:
    return np.asarray(s3_image(stack, key)[0])


@pytest.mark.slow
@pytest.mark.timeout(900)  # two CPU inductor boots: ~1-4 min on an idle 2-core box, more under load
@pytest.mark.parametrize("precompile", ["on", "off"])
def test_the_second_worker_loads_the_compiled_engine_from_s3_and_compiles_nothing(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precompile: str
) -> None:
    # Each boot gets its own folder (and inductor's own caches inside it): the second machine
    # shares nothing with the first but the S3 bundle. "on" is the worker's default (dynamo's output
    # in the bundle: the second boot traces nothing); TORCH_CACHING_PRECOMPILE=0 turns it off (the
    # bundle holds inductor's graphs, which the second boot finds after tracing).
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    env = {} if precompile == "on" else {"TORCH_CACHING_PRECOMPILE": "0"}
    prefix = f"compile/{uuid.uuid4().hex[:8]}"
    remote = f"s3://{stack.bucket}/{prefix}"

    first, found = _boot_once(stack, ["first"], f"{tmp_path / 'a'},{remote}", [256], **env)
    assert first["compile_cache"] == "miss"
    assert first["graphs_compiled"] > 0 and first["graphs_from_cache"] == 0
    assert first["precompiled_from_cache"] == 0
    (bundle,) = (tmp_path / "a").glob("*.bundle")
    listed = stack.client("s3").list_objects_v2(Bucket=stack.bucket, Prefix=prefix)["Contents"]
    assert [obj["Key"] for obj in listed] == [f"{prefix}/{bundle.name}"]
    assert found["first"]["status"] == "succeeded", found

    # The same job, and one at a size that was not compiled (it runs eager: it still succeeds).
    second, found = _boot_once(stack, ["second", "wider"], f"{tmp_path / 'b'},{remote}", [256, 320], **env)
    assert second["compile_cache"] == "hit"
    assert second["graphs_compiled"] == 0
    if precompile == "on":  # every compiled function came whole from the bundle: nothing traced
        assert second["dynamo_graphs"] == 0 and second["graphs_from_cache"] == 0
        assert second["precompiled_from_cache"] > 0
    else:
        assert second["dynamo_graphs"] > 0 and second["graphs_from_cache"] == first["graphs_compiled"]
        assert second["precompiled_from_cache"] == 0
    assert (tmp_path / "b" / bundle.name).read_bytes() == bundle.read_bytes()  # kept on local disk
    assert all(result["status"] == "succeeded" for result in found.values()), found
    # The loaded engine runs the kernels the first one compiled: the very same image.
    assert np.array_equal(_pixels(stack, "second.png"), _pixels(stack, "first.png"))
    assert s3_image(stack, "wider.png")[0].size == (320, 256)
    for phase in ("imports_s", "weights_s", "cache_load_s", "compile_s", "warm_up_s"):
        assert second[phase] >= 0, phase


@pytest.mark.slow
@pytest.mark.timeout(900)  # two CPU inductor boots with LoRA hotswap slots
def test_lora_jobs_on_a_worker_loaded_from_the_bundle_give_the_compiling_workers_images(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hotswap slots are part of every compiled transformer block: adapters are copied into
    # them per job. Functions taken whole from the bundle keep no identity guards (compile_cache.
    # use_precompiled_functions), so this checks that what an adapter changes still reaches them.
    from tests.lora_files import make_adapter

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    key = "loras/style.safetensors"
    stack.client("s3").put_object(Bucket=stack.bucket, Key=key, Body=make_adapter(tmp_path, seed=3))
    env = {"TORCH_COMPILE": "true", "COMPILE_SIZES": COMPILED, "MAX_LORAS": "1", "LORA_MAX_RANK": "8"}

    def boot(name: str) -> dict[str, Any]:
        plain, styled = _job(stack, f"{name}-plain", 256, 256), _job(stack, f"{name}-lora", 256, 256)
        styled["input"]["loras"] = [{"url": stack.presign_get(key), "scale": 1.0}]
        phases, found = serve_jobs(stack, [plain, styled], COMPILE_CACHE=str(tmp_path / name), **env)
        assert all(result["status"] == "succeeded" for result in found.values()), found
        return phases

    first = boot("first")
    _bundles_only(tmp_path / "first", tmp_path / "second")
    second = boot("second")

    assert first["compile_cache"] == "miss" and second["compile_cache"] == "hit"
    assert second["dynamo_graphs"] == 0 and second["precompiled_from_cache"] > 0
    for job in ("plain", "lora"):
        assert np.array_equal(_pixels(stack, f"second-{job}.png"), _pixels(stack, f"first-{job}.png")), job
    assert not np.array_equal(_pixels(stack, "second-lora.png"), _pixels(stack, "second-plain.png"))


def _bundles_only(machine: Path, new_machine: Path) -> None:
    """What a new container has: the bundles from the store, none of inductor's caches beside them."""
    new_machine.mkdir()
    for bundle in machine.glob("*.bundle"):
        (new_machine / bundle.name).write_bytes(bundle.read_bytes())


@pytest.mark.slow
@pytest.mark.timeout(900)  # two CPU inductor boots of the quantized tiny model
def test_an_fp8_worker_boots_with_a_compile_cache_and_the_next_one_compiles_nothing(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # klein-9B is served in FP8: torchao's Float8Tensor weights, which torch cannot carry in a
    # precompiled function (compile_cache.precompile_refused: with dynamo's output in the bundle
    # the first compile failed, and the boot with it). The bundle holds inductor's graphs instead.
    # A CPU has no FP8 tensor cores, so only the weights are FP8 here; their tensor class is the
    # served one.
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    env = {"TORCH_COMPILE": "true", "COMPILE_SIZES": COMPILED, "QUANTIZATION": "fp8"}

    def boot(name: str) -> dict[str, Any]:
        phases, found = serve_jobs(
            stack, [_job(stack, name, 256, 256)], COMPILE_CACHE=str(tmp_path / name), **env
        )
        assert found[name]["status"] == "succeeded", found
        return phases

    first = boot("first")
    (bundle,) = (tmp_path / "first").glob("*.bundle")
    assert bundle.name.startswith("flux2-klein-tiny-fp8-")
    _bundles_only(tmp_path / "first", tmp_path / "second")
    second = boot("second")

    assert first["compile_cache"] == "miss" and first["graphs_compiled"] > 0
    assert second["compile_cache"] == "hit" and second["graphs_compiled"] == 0
    assert second["graphs_from_cache"] == first["graphs_compiled"] and second["precompiled_from_cache"] == 0
    assert np.array_equal(_pixels(stack, "second.png"), _pixels(stack, "first.png"))


def _key(**change: str) -> dict[str, str]:
    key = {"device": "cpu", "capability": "x86_64", "torch": "2.x", "variant": "flux2-klein-tiny"}
    key.update(quantization="none", sizes="64x64:1", engine_source="abc")
    return {**key, **change}


def _bundle(key: dict[str, str], payload: bytes = b"artifacts") -> bytes:
    import hashlib

    from handlers.engines.compile_cache import MAGIC

    header = {"key": key, "sha256": hashlib.sha256(payload).hexdigest(), "compile_s": 12.0}
    return MAGIC + json.dumps(header).encode() + b"\n" + payload


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "bad magic"),
        (b"PK\x03\x04 a zip file", "bad magic"),
        (_bundle(_key())[:-3], "checksum mismatch"),
        (_bundle(_key()).replace(b"artifacts", b"ARTIFACTS"), "checksum mismatch"),
        (_bundle(_key(torch="2.0")), "torch '2.0' != '2.x'"),
        (_bundle(_key(engine_source="old")), "engine_source 'old' != 'abc'"),
        (_bundle(_key()), "torch could not"),  # right key, payload torch cannot read
    ],
)
def test_a_damaged_or_foreign_bundle_is_refused_with_the_reason(data: bytes, reason: str) -> None:
    from handlers.engines.compile_cache import BundleError, load

    with pytest.raises(BundleError, match=reason.replace("(", r"\(")):
        load(data, _key())


def test_the_key_names_the_setup_and_the_sizes() -> None:
    from importlib import metadata

    import torch

    from handlers.engines.compile_cache import bundle_name, cache_key

    setup = {"device": torch.device("cpu"), "variant": "flux2-klein-tiny", "quantization": "none"}
    key = cache_key(**setup, sizes=((1, 64, 64),), regions=("transformer", "vae"))
    assert key["device"] == "cpu" and key["torch"] == metadata.version("torch")
    assert key["sizes"] == "64x64:1" and len(key["engine_source"]) == 16
    assert key["regions"] == "transformer,vae" and key["spandrel"] == metadata.version("spandrel")
    other = cache_key(**setup, sizes=((2, 64, 64),), regions=("transformer", "vae"))
    assert bundle_name(key) != bundle_name(other)
    # COMPILE_REGIONS: a bundle without the upscaler's graphs (or with the text encoder's) misses.
    upscaler = cache_key(**setup, sizes=((1, 64, 64),), regions=("transformer", "vae", "upscaler"))
    assert bundle_name(key) != bundle_name(upscaler)
    assert bundle_name(key).startswith("flux2-klein-tiny-none-")


def test_the_lora_hotswap_slot_is_part_of_the_key() -> None:
    # The slot is compiled into every Linear of the transformer: a bundle made with MAX_LORAS=0, or
    # another LORA_MAX_RANK, holds other graphs and must miss, not load.
    from handlers.engines.compile_cache import bundle_name, cache_key
    from handlers.engines.klein_loader import create_klein_engine
    from worker.compile_boot import lora_slot

    slotted = create_klein_engine(model="tiny", compile=True, max_loras=2, lora_max_rank=8)
    plain = create_klein_engine(model="tiny", compile=True, max_loras=0)
    assert (lora_slot(slotted), lora_slot(plain)) == ("2x8", "none")
    keys = [
        cache_key(
            device=e.device,
            variant="flux2-klein-tiny",
            quantization="none",
            sizes=e.compile_sizes,
            regions=e.compile_regions,
            lora_slot=slot,
        )
        for e, slot in ((slotted, lora_slot(slotted)), (plain, lora_slot(plain)))
    ]
    assert keys[0]["lora_slot"] == "2x8" and bundle_name(keys[0]) != bundle_name(keys[1])


def _tiny_engine_compiled_eager() -> Any:
    """In-process, what a new worker process starts from: dynamo reset, and a tiny engine whose
    default regions compile at its first run at 64x64, with dynamo's eager backend standing in for
    inductor (traced, no codegen)."""
    import torch
    from torch._dynamo.utils import counters

    from handlers.engines.klein_loader import create_klein_engine
    from klein_facts.compile_regions import DEFAULT_COMPILE_REGIONS

    torch._dynamo.reset()
    counters.clear()
    torch.compiler.set_stance("default")
    engine = create_klein_engine(model="tiny", compile_sizes=((1, 64, 64),))
    engine.compile_at_first_run(DEFAULT_COMPILE_REGIONS, backend="eager")
    return engine


def _warm_up_through(engine: Any, folder: Path) -> dict[str, Any]:
    """The boot's compile step for ``engine`` with ``folder`` as COMPILE_CACHE; its boot phases."""
    from worker import compile_boot

    phases: dict[str, Any] = {}
    compile_boot.warm_up(
        engine, variant="flux2-klein-tiny", quantization="none", stores=[FolderStore(folder)], phases=phases
    )
    return phases


def _one_image(engine: Any) -> Any:
    (image,) = engine.generate(
        prompts=["x"], seeds=[1], references=[], width=64, height=64, num_steps=1, guidance_scale=1.0
    )
    return image


def test_a_bad_bundle_on_disk_means_a_warning_and_a_normal_compile(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The boot path itself, with dynamo's eager backend standing in for inductor (no codegen).
    from handlers.engines.compile_cache import bundle_name, cache_key

    engine = _tiny_engine_compiled_eager()
    key = cache_key(
        device=engine.device,
        variant="flux2-klein-tiny",
        quantization="none",
        sizes=((1, 64, 64),),
        regions=engine.compile_regions,
        precompile=True,  # the boot's default with a compile cache
    )
    (tmp_path / bundle_name(key)).write_bytes(_bundle(key)[:-1])  # truncated

    with caplog.at_level(logging.INFO):
        phases = _warm_up_through(engine, tmp_path)

    assert phases["compile_cache"] == "miss" and phases["compile_s"] > 0 and phases["warm_up_s"] > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checksum mismatch" in w and "compiling instead" in w for w in warnings), warnings
    assert any("cache miss" in r.getMessage() for r in caplog.records)
    assert _one_image(engine).size == (64, 64)


def test_a_bundle_torch_cannot_save_is_a_warning_and_the_engine_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch pickles what it compiled (dynamo's output too): should that fail, the boot goes on.
    import torch

    def unpicklable() -> None:
        raise TypeError("cannot pickle 'generator' object")

    engine = _tiny_engine_compiled_eager()
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", unpicklable)

    with caplog.at_level(logging.WARNING):
        phases = _warm_up_through(engine, tmp_path)

    assert phases["compile_cache"] == "miss" and not list(tmp_path.glob("*.bundle"))
    assert any(
        "torch could not save the compiled engine: TypeError" in r.getMessage()
        and "no bundle saved" in r.getMessage()
        for r in caplog.records
    )
    assert _one_image(engine).size == (64, 64)


def test_dynamo_keeps_on_disk_only_the_functions_of_the_bundle_this_boot_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dynamo files precompiled functions by function name alone: another setup's must not survive a
    # boot with another bundle, and the same bundle's must survive a second worker of the same box.
    from handlers.engines.compile_cache import use_precompiled_functions

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    entry = tmp_path / "dynamo" / "0123abcd" / "entry"

    def earlier_boot_left_an_entry() -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_bytes(b"a precompiled function")

    earlier_boot_left_an_entry()
    use_precompiled_functions("flux2-klein-4b-none-aaa.bundle")
    assert not entry.exists()  # no marker: whose it was is unknown
    earlier_boot_left_an_entry()
    use_precompiled_functions("flux2-klein-4b-none-aaa.bundle")
    assert entry.exists()  # the same bundle's (another GPU's worker, or the last boot)
    use_precompiled_functions("flux2-klein-4b-fp8-bbb.bundle")
    assert not entry.exists()


def test_a_hit_whose_precompiled_functions_do_not_load_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # dynamo's eager backend cannot be packed with a function ("Backend not found"): a bundle made
    # with it loads, but its functions are traced again. The boot works, and warns.
    with caplog.at_level(logging.INFO):
        boots = [_warm_up_through(_tiny_engine_compiled_eager(), tmp_path / "cache") for _ in range(2)]

    assert [boot["compile_cache"] for boot in boots] == ["miss", "hit"]
    assert boots[1]["dynamo_graphs"] > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("graphs were traced: its precompiled functions did not load" in w for w in warnings), warnings


def test_stores_from_compile_cache(tmp_path: Path) -> None:
    default = tmp_path / "default"
    (only,) = open_stores(None, default_folder=default)
    assert isinstance(only, FolderStore) and only.root == default
    assert open_stores("off", default_folder=default) == []
    stores = open_stores("s3://bucket/some/prefix", default_folder=default, s3_client=lambda: object())
    assert [s.description for s in stores] == [str(default), "s3://bucket/some/prefix"]
    mine = tmp_path / "mine"
    assert [s.description for s in open_stores(f" {mine} ", default_folder=default)] == [str(mine)]
    with pytest.raises(ValueError, match="COMPILE_CACHE: 'http://x/y'"):
        open_stores("http://x/y", default_folder=default)


def test_an_s3_hit_is_copied_to_the_local_folder(stack: LocalStack, tmp_path: Path) -> None:
    s3 = stack.client("s3")
    remote = S3Store(s3, stack.bucket, f"cc-{uuid.uuid4().hex[:8]}/")
    local = FolderStore(tmp_path / "local")
    assert fetch([local, remote], "b.bundle").data is None  # a miss everywhere is no error
    remote.put("b.bundle", b"bytes")

    found = fetch([local, remote], "b.bundle")

    assert (found.data, found.source) == (b"bytes", remote.description)
    assert local.get("b.bundle") == b"bytes"
    assert fetch([local, remote], "b.bundle").source == local.description


def test_an_unreachable_store_is_a_warning_and_a_miss(
    stack: LocalStack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = S3Store(stack.client("s3"), "no-such-bucket-here", "x")
    local = FolderStore(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert fetch([gone, local], "b.bundle").data is None
    assert any("s3://no-such-bucket-here/x unreadable" in r.getMessage() for r in caplog.records)


def test_a_bad_compile_cache_value_is_a_boot_error(tmp_path: Path) -> None:
    from worker.boot import compile_stores
    from worker.boot_error import BootError
    from worker.config import Settings

    with pytest.raises(BootError, match="neither a folder nor s3://bucket/prefix"):
        compile_stores(Settings(compile_cache="ftp://host/x"), tmp_path)


@pytest.mark.parametrize("text", ["1024", "1024x1000", "512x512:0", "axb", "4096x1024", "64x64"])
def test_compile_sizes_are_checked_naming_the_variable(text: str) -> None:
    from pydantic import ValidationError

    from worker.config import Settings

    with pytest.raises(ValidationError, match="COMPILE_SIZES"):
        Settings(compile_sizes=text)


def test_compile_sizes_parse() -> None:
    from worker.config import Settings

    assert Settings().compile_shapes() == ((1, 1024, 1024),)
    assert Settings(compile_sizes="768x1344:2, 256x256").compile_shapes() == ((2, 768, 1344), (1, 256, 256))
