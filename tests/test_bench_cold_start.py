"""scripts/bench_cold_start.py: a real worker process from spawn to its first result, from disk."""

from __future__ import annotations

import json
from pathlib import Path

from measurement.page_cache import read_ahead_kb
from tests.helpers import load_script


def test_cold_start_from_a_saved_folder_reaches_a_result(tmp_path: Path, capsys) -> None:
    bench = load_script("bench_cold_start")
    out = tmp_path / "cold.json"
    folder = tmp_path / "klein"

    argv = [
        "--runs",
        "1",
        "--size",
        "256",
        "--save-tiny",
        str(folder),
        "--drop-page-cache",
        "--json",
        str(out),
    ]
    assert bench.main(argv) == 0

    assert (folder / "model_index.json").is_file()  # written with save_pretrained, loaded as MODEL_PATH
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["model"] == "flux2-klein-4b-bf16"  # the real loading path, not MODEL=tiny
    assert 0 < run["to_ready_s"] < run["to_first_result_s"]
    assert run["first_job_s"] > 0 and run["load_s"] > 0
    assert run["boot"]["weights_s"] > 0 and run["boot"]["compile_cache"] == "not compiled"  # CPU default
    # From a cold disk (where the folder's filesystem lets its pages go), read ahead while importing.
    assert run["cold_disk"] == (read_ahead_kb(folder) is not None)
    assert run["boot"]["prefetch_s"] is not None
    assert "start -> first result" in capsys.readouterr().out


def test_bundle_only_leaves_a_new_containers_folder(tmp_path: Path) -> None:
    # --bundle-only-runs: what a new container has after fetching the bundle, none of the instance's caches.
    from measurement.cold_start import keep_only_bundles

    folder = tmp_path / "cc"
    (folder / "inductor" / "dynamo").mkdir(parents=True)
    (folder / "inductor" / "dynamo" / "package").write_bytes(b"x")
    (folder / "flux2-klein-tiny-none-abc.bundle").write_bytes(b"bundle")
    (folder / "stray.tmp").write_bytes(b"partial upload")

    assert keep_only_bundles(f"{folder}, s3://bucket/prefix") == 1
    assert sorted(p.name for p in folder.iterdir()) == ["flux2-klein-tiny-none-abc.bundle"]
    assert keep_only_bundles("") == 0
