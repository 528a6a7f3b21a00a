"""scripts/bench_gpu.py's measurement modes on the CPU (``--smoke``): the code path a GPU run takes."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import load_script


def _bench_gpu() -> ModuleType:
    # In-process (the script's own main) to skip a second torch import.
    bench = load_script("bench_gpu")
    return bench


def test_the_gpu_benchmark_times_the_upscaler_eager_and_compiled(tmp_path: Path) -> None:
    # bench_gpu.py --upscale-only, on the tiny upscaler with dynamo's eager backend: the code path
    # of the GPU run that fills BENCHMARKS.md's "1024 -> 4096 x4 compiled" row.

    bench = load_script("bench_gpu")
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--compile-backend", "eager", "--upscale-only", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = [(row["tile"], row["compiled"]) for row in report["upscale_x4"]]
    assert rows == [(32, False), (None, False), (32, True), (None, True)]
    assert report["stages"] == []  # no klein built
    for row in report["upscale_x4"]:
        assert row["s"] > 0 and row["output"] == 4 * row["input"]
        assert row["graphs_compiled_during_runs"] == 0  # no compile hidden in the timed runs
        assert (row["compile_s"] is not None) == row["compiled"]


def test_the_gpu_benchmark_profiles_one_image_of_the_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --profile: one image under torch.profiler, summarised (GPU idle, host waits, top host ops) and
    # the full table beside the JSON. On the CPU no device activity: the code path only.
    bench = _bench_gpu()
    out = tmp_path / "bench.json"
    argv = ["--smoke", "--skip-plain", "--skip-upscale", "--profile", "--json", str(out)]
    assert bench.main(argv) == 0
    found = json.loads(out.read_text())["profile"]
    assert found["wall_ms"] > 0 and found["device_busy_ms"] == 0 and found["device_idle_ms"] is None
    ops = {row["op"] for row in found["top_host_ops"]}
    assert "aten::linear" in ops or "aten::addmm" in ops or "aten::mm" in ops  # the models ran in it
    assert "Self CPU time total" in (tmp_path / "bench.profile.txt").read_text()
    assert "Profiled image:" in capsys.readouterr().out


def test_the_compiled_stage_compiles_each_region_asked_for(tmp_path: Path) -> None:
    # --compile-regions with the text encoder, region by region (dynamo's eager backend): each
    # region's warm-up really compiles its own graphs. After the first region's warm-up dynamo
    # refuses new compiles (the worker's stance); without resetting it the next regions ran eager.
    import torch

    # As in the fresh process the script runs in: earlier tests' compiles of the same block classes
    # stay on their code objects, and past dynamo's recompile limit a region would run eager here.
    torch._dynamo.reset()
    bench = _bench_gpu()
    out = tmp_path / "bench.json"
    regions = "transformer,vae,text_encoder"
    argv = ["--smoke", "--compile-backend", "eager", "--skip-plain", "--skip-upscale"]
    assert bench.main([*argv, "--compile-regions", regions, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [stage["stage"] for stage in report["stages"]] == ["engine none", "compiled none"]
    for region in regions.split(","):
        assert report[f"compile_warmup_{region}_s"] > 0, region
        assert report[f"compile_graphs_{region}"] > 0, region
    assert report["compile_warmup_s"] == pytest.approx(
        sum(report[f"compile_warmup_{region}_s"] for region in regions.split(","))
    )
