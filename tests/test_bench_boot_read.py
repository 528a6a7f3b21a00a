"""scripts/bench_boot_read.py --smoke: fresh processes reading a klein folder from a cold page cache,
without and with the read ahead the worker starts before importing torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from measurement.page_cache import read_ahead_kb
from tests.helpers import load_script


def test_the_boot_read_benchmark_runs_both_boots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if read_ahead_kb(tmp_path) is None:
        pytest.skip(f"{tmp_path} is on no block device (tmpfs?): its page cache cannot be dropped")
    bench = load_script("bench_boot_read")
    out = tmp_path / "report.json"
    assert bench.main(["--smoke", "--dir", str(tmp_path / "klein"), "--runs", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    without, with_prefetch = report["runs"]
    assert (without["prefetch"], with_prefetch["prefetch"]) == (False, True)
    assert "prefetch_s" not in without
    assert (
        with_prefetch["prefetch_gb"] >= 0 and with_prefetch["prefetch_s"] is not None
    )  # the thread finished
    for run in report["runs"]:
        assert run["process_s"] >= run["total_s"] >= run["imports_s"] > 0
    assert (tmp_path / "klein" / "model_index.json").is_file()  # the folder the worker's loader takes
    assert "| read ahead |" in capsys.readouterr().out
