"""scripts/gpu_checks.sh: every step's command line is accepted by its script, and every preset fits
in one call of a lent GPU. A GPU lease is a few minutes once in a while: a mistyped flag found there
costs the lease; found here it costs nothing."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_checks.sh"
PRESETS = ("issue10", "issue10-fp8", "issue10-static", "issue10-regions")
# One call on a lent machine runs at most 10 minutes; leave room for the start and the copy back.
CALL_LIMIT_S = 570


def _steps() -> list[str]:
    """The step names of the script's ``case $name`` (presets are expanded before it)."""
    body = SCRIPT.read_text().split("case $name in", 1)[1]
    labels = re.findall(r"^    ([a-z0-9| -]+)\)$", body, re.MULTILINE)
    return [name.strip() for label in labels for name in label.split("|")]


def _dry_run(tmp_path: Path, *steps: str) -> list[tuple[str, int, list[str]]]:
    env = {**os.environ, "GPU_CHECKS_DRY_RUN": "1", "PYTHON": "python"}
    done = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out"), *steps],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = re.findall(r"^== (\S+) \(limit (\d+)s\): (.*)$", done.stdout, re.MULTILINE)
    return [(name, int(limit), shlex.split(command)) for name, limit, command in found]


def _script(path: str) -> ModuleType:
    assert Path(path).parent.name == "scripts", path
    return load_script(Path(path).stem)


def test_every_step_command_parses_with_its_script(tmp_path: Path) -> None:
    steps = _steps()
    assert {"cold-4b-cache", "bench-4b-stages", "upscale-x4", "textenc-4b"} <= set(steps)
    ran = _dry_run(tmp_path, *steps)
    assert [name for name, _, _ in ran] == steps
    for name, _, argv in ran:
        if argv[1].startswith("scripts/"):
            args = _script(argv[1]).parse_args(argv[2:])  # argparse exits on an unknown flag
            assert args is not None, name
        elif argv[1:3] == ["-m", "pytest"]:
            assert all((ROOT / arg).is_file() for arg in argv if arg.startswith("tests/")), name


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_fits_in_one_device_call(tmp_path: Path, preset: str) -> None:
    ran = _dry_run(tmp_path, preset)
    assert ran[0][0] == "deps" and len(ran) > 1
    assert sum(limit for _, limit, _ in ran) <= CALL_LIMIT_S, preset


def test_an_unknown_step_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path), "bench-4b-typo"],
        cwd=ROOT,
        env={**os.environ, "GPU_CHECKS_DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "unknown step: bench-4b-typo" in done.stderr
