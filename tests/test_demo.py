"""`python -m worker demo`: the newcomer's one command works from an empty directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def _demo(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m worker demo` as a newcomer runs it: no AWS, queue or model settings from this shell."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "QUEUE_", "MODEL"))}
    return subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--out", str(tmp_path / "outputs")],
        cwd=tmp_path,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_runs_the_samples_and_saves_images(tmp_path):
    proc = _demo(tmp_path)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = {p.name: Image.open(p) for p in (tmp_path / "outputs").iterdir()}
    assert set(saved) == {
        "story-1.png",
        "story-2.png",
        "batch-0.webp",
        "batch-1.webp",
        "batch-2.webp",
        "photo-x4.png",
        "urgent-x2.png",
        "lighthouse-lora.webp",
    }
    assert saved["story-1.png"].size == (256, 256) and saved["story-1.png"].format == "PNG"
    assert saved["batch-0.webp"].size == (256, 320) and saved["batch-0.webp"].format == "WEBP"
    assert saved["photo-x4.png"].size == (512, 384)
    # The LoRA job: the batch's lighthouse (same size and seed) with an adapter applied.
    assert saved["lighthouse-lora.webp"].size == (256, 320)
    assert saved["lighthouse-lora.webp"].tobytes() != saved["batch-1.webp"].tobytes()
    assert "demo-lora" in proc.stdout
    assert "demo-invalid" in proc.stdout and "invalid_input" in proc.stdout
    # The urgent job went through the high-priority queue (QUEUE_URLS), and its result says so.
    assert saved["urgent-x2.png"].size == (256, 192)
    assert '"queue": "http' in proc.stdout and "klein-jobs-high" in proc.stdout
    assert "X-Amz-Signature" not in proc.stdout + proc.stderr
    # The job lines, the table and the results, nothing else: no moto access lines, no library
    # warnings (torch's deprecation notes, diffusers' torchao import note), no progress bars.
    assert proc.stderr == ""
    for noise in ("HTTP/1.1", "Unable to import", "deprecated", "it/s]"):
        assert noise not in proc.stdout


def test_demo_uses_the_real_model_only_where_a_gpu_and_its_weights_are(tmp_path):
    from worker.demo import default_model

    assert default_model(gpu_found=False, model_path="/models/klein") == "tiny"
    assert default_model(gpu_found=True, model_path="/models/klein") == "auto"
    assert default_model(gpu_found=True, model_path=None, hub_cache=str(tmp_path)) == "tiny"
    # A Hugging Face cache holding the klein-4B snapshot counts as weights present.
    repo = tmp_path / "models--black-forest-labs--FLUX.2-klein-4B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model_index.json").write_text("{}")
    assert default_model(gpu_found=True, model_path=None, hub_cache=str(tmp_path)) == "auto"


def test_an_invalid_setting_stops_the_demo_with_one_line(tmp_path):
    proc = _demo(tmp_path, MODEL="klein-5b")
    assert proc.returncode == 3
    (line,) = proc.stderr.splitlines()
    assert "cannot start: MODEL=klein-5b: Input should be" in line and "Traceback" not in proc.stdout
