"""The weights read ahead at boot (worker/prefetch.py): exactly what the engine will read of a
diffusers klein folder, into the page cache, and nothing where it would not fit."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from measurement.page_cache import evict, read_ahead_kb, resident_bytes
from tests.production import deep_tiny_pipeline
from worker.prefetch import plan, start_prefetch, tensor_ranges, weight_files

DEPTH = 30  # stacks layers (9, 18, 27) like the official checkpoints: layers 28..30 are dropped


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A klein folder as the hub lays it out: a sharded transformer, a deep text encoder with its own
    head, and a single-file checkpoint at the root that diffusers never loads."""
    folder = tmp_path_factory.mktemp("klein")
    pipeline = deep_tiny_pipeline(DEPTH)
    pipeline.save_pretrained(folder)
    pipeline.transformer.save_pretrained(folder / "transformer", max_shard_size="100KB")
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink(missing_ok=True)
    (folder / "flux-2-klein-4b.safetensors").write_bytes(b"\0" * 4096)
    return folder


def _covered(spans: list, path: Path, start: int, end: int) -> bool:
    return any(s.path == path and s.start <= start and end <= s.end for s in spans)


def _overlaps(spans: list, path: Path, start: int, end: int) -> bool:
    return any(s.path == path and s.start < end and start < s.end for s in spans)


def test_the_plan_is_what_the_engine_reads(folder: Path) -> None:
    spans = plan(folder)
    shards = weight_files(folder / "transformer")
    assert len(shards) > 1 and all(".safetensors" in shard.name for shard in shards)
    files = {span.path for span in spans}
    assert set(shards) <= files
    assert folder / "vae" / "diffusion_pytorch_model.safetensors" in files
    assert folder / "flux-2-klein-4b.safetensors" not in files  # diffusers never loads it
    (text_encoder,) = weight_files(folder / "text_encoder")
    for name, (start, end) in tensor_ranges(text_encoder).items():
        parts = name.split(".")
        dropped = name.startswith("lm_head.") or (parts[1] == "layers" and int(parts[2]) >= 27)
        if dropped:
            assert not _overlaps(spans, text_encoder, start, end), name
        else:
            assert _covered(spans, text_encoder, start, end), name
    for shard in shards:  # whole files
        assert _covered(spans, shard, 0, shard.stat().st_size)


def test_the_read_ahead_puts_the_plan_in_the_page_cache(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if read_ahead_kb(folder) is None:
        pytest.skip(f"{folder} is on no block device (tmpfs?): its page cache cannot be dropped")
    spans = plan(folder)
    for path in {span.path for span in spans}:
        assert evict(path)
    with caplog.at_level(logging.INFO):
        prefetch = start_prefetch(folder, available=1 << 40)
    assert prefetch is not None
    prefetch.wait(timeout=60)
    planned = sum(span.end - span.start for span in spans)
    assert prefetch.read_bytes == prefetch.planned_bytes == planned
    assert prefetch.report()["prefetch_s"] is not None and prefetch.error is None
    for span in spans:
        assert resident_bytes(span.path, [(span.start, span.end)]) == span.end - span.start
    assert any(
        "ahead of the load" in r.getMessage() and str(folder) in r.getMessage() for r in caplog.records
    )


def test_no_read_ahead_where_memory_could_not_hold_it(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    planned = sum(span.end - span.start for span in plan(folder))
    with caplog.at_level(logging.INFO):
        assert start_prefetch(folder, available=planned) is None  # the page cache would drop it again
    assert any("weights prefetch skipped" in r.getMessage() for r in caplog.records)
    assert start_prefetch(folder, available=2 * planned) is not None


def test_no_read_ahead_without_a_klein_folder(tmp_path: Path, folder: Path) -> None:
    assert start_prefetch(None) is None
    assert start_prefetch(tmp_path) is None  # no model_index.json: the load says what is wrong
    nunchaku = plan(folder, components=("vae", "text_encoder"))  # its transformer comes from elsewhere
    assert not any(span.path.parent.name == "transformer" for span in nunchaku)


def test_a_folder_that_cannot_be_planned_is_a_warning_not_a_failure(
    tmp_path: Path, folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "text_encoder" / "config.json").write_text("{")  # the load will name the file
    assert start_prefetch(broken, available=1 << 40) is None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"weights prefetch skipped: {broken} could not be planned" in warning
