"""scripts/bench_lora.py --smoke: the LoRA cost measurement a GPU run makes, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_script


def test_lora_benchmark_smoke_measures_both_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("bench_lora")
    out = tmp_path / "lora.json"
    assert bench.main(["--smoke", "--slot-overhead", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["mode"] for row in report["modes"]] == ["eager", "compiled"]
    for row in report["modes"]:
        for key in ("first_use_s", "switch_s", "leave_s", "s_per_image", "s_per_image_lora"):
            assert row[key] > 0
    assert report["modes"][1]["s_per_image_no_slots"] > 0
    assert "| compiled |" in capsys.readouterr().out
