"""scripts/bench_text_encoder_read.py and the page-cache accounting it reads: what a load read from disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from measurement.page_cache import evict, read_ahead_kb, resident_bytes
from tests.helpers import load_script
from worker.prefetch import tensor_ranges

MB = 1 << 20


@pytest.fixture
def on_disk(tmp_path: Path) -> Path:
    if read_ahead_kb(tmp_path) is None:
        pytest.skip(f"{tmp_path} is on no block device (tmpfs?): its page cache cannot be dropped")
    return tmp_path


def test_the_page_cache_shows_which_bytes_a_read_brought_in(on_disk: Path) -> None:
    path = on_disk / "blob"
    size = 64 * MB  # well past any read-ahead window, so the far end stays on disk
    with path.open("wb") as file:
        for _ in range(size // MB):
            file.write(os.urandom(MB))
    assert evict(path)
    assert resident_bytes(path) == 0
    with path.open("rb") as file:
        file.read(4096)
    first_page = resident_bytes(path, [(0, 4096)])
    assert first_page == 4096
    assert resident_bytes(path, [(size - MB, size)]) == 0
    assert 4096 <= resident_bytes(path) < size
    # Ranges are clipped to their bytes, not rounded out to whole pages.
    assert resident_bytes(path, [(100, 300)]) == 200


def test_tensor_ranges_are_where_safetensors_keeps_each_tensor(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    tensors = {
        "b.weight": torch.arange(6, dtype=torch.float32),
        "a.bias": torch.ones(3, dtype=torch.bfloat16),
    }
    save_file(tensors, path)
    data = path.read_bytes()
    ranges = tensor_ranges(path)
    assert set(ranges) == set(tensors)
    with safe_open(path, framework="pt") as file:
        for name, (start, end) in ranges.items():
            expected = file.get_tensor(name)
            assert data[start:end] == expected.view(torch.uint8).numpy().tobytes()


def test_the_benchmark_reads_the_text_encoder_whole_and_cut(
    on_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_script("bench_text_encoder_read")
    out = on_disk / "report.json"
    assert bench.main(["--smoke", "--dir", str(on_disk / "te"), "--runs", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [run["mode"] for run in report["runs"]] == ["whole", "cut"]
    whole, cut = report["medians"]["whole"], report["medians"]["cut"]
    assert whole["layers_kept"] == cut["layers_kept"] == 27  # layers 9, 18, 27 of 36 stacked
    for row in (whole, cut):
        assert 0 < row["read_bytes"] <= row["files_bytes"]
        assert row["total_s"] >= row["load_s"] > 0
    assert report["read_ahead_kb"] == read_ahead_kb(on_disk)
    assert "| cut | 27 |" in capsys.readouterr().out
