"""Settings (TOML, environment, command line), the worker launch spec, and benchmark profile reading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from provisioning.config import load_settings
from provisioning.launch_env import masked_env
from provisioning.models import Offer
from provisioning.profile_figures import LooseProfile as BenchmarkProfile
from provisioning.profile_figures import load_profiles
from provisioning.throughput import ThroughputModel, normalize_gpu_name

TOML = """
fleet = "prod"
image = "ghcr.io/acme/klein-worker:1.0"
queue_url = "https://sqs.us-east-1.amazonaws.com/1/jobs"
max_instances = 8
max_hourly_usd = 3.5
cold_mult = 1.5

[offers]
variant = "klein-9b-fp8"
min_reliability = 0.99
gpu_names = ["RTX 5090"]

[policy]
boot_deadline_s = 900

[worker]
disk_gb = 60
env = { MODEL = "klein-4b", MAX_BATCH = "4" }
pass_env = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"]
registry_user = "bot"
"""


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    for name in ("QUEUE_URL", "VAST_API_KEY", "VAST_API_URL", "KLEIN_FLEET_MAX_INSTANCES"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "fleet.toml"
    path.write_text(TOML)
    return path


def test_toml_values_reach_the_policy_and_the_offer_filters(config_file):
    s = load_settings(config_file)
    assert (s.fleet, s.max_instances, s.max_hourly_usd) == ("prod", 8, 3.5)
    req = s.requirements()
    assert req.min_vram_gb == 32.0 and req.min_reliability == 0.99 and req.gpu_names == ("RTX 5090",)
    assert req.min_disk_gb == 60.0  # never rent less disk than the worker asks for
    assert req.to_query()["gpu_ram"] == {"gte": 32000}
    policy = s.policy_config()
    assert policy.boot_deadline_s == 900 and policy.max_instances == 8 and policy.image == s.image
    assert policy.cold_mult == 1.5 and policy.cold_pool == 6  # the pool's floor keeps its default


def test_command_line_beats_environment_beats_file(config_file, monkeypatch):
    monkeypatch.setenv("KLEIN_FLEET_MAX_INSTANCES", "5")
    monkeypatch.setenv("KLEIN_FLEET_POLICY__SCALE_IN_AFTER_S", "120")
    monkeypatch.setenv("VAST_API_URL", "http://127.0.0.1:9")
    s = load_settings(config_file)
    assert s.max_instances == 5 and s.policy.scale_in_after_s == 120 and s.policy.boot_deadline_s == 900
    assert s.vast_api_url == "http://127.0.0.1:9"
    assert load_settings(config_file, max_instances=2, fleet=None).max_instances == 2
    monkeypatch.setenv("KLEIN_FLEET_COLD_MULT", "3")
    assert load_settings(config_file).policy_config().cold_mult == 3.0
    assert load_settings(config_file, cold_mult=0.0).policy_config().cold_mult == 0.0


def test_typos_in_the_file_are_errors(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("max_instance = 3\n")
    with pytest.raises(ValidationError):
        load_settings(path)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")
    with pytest.raises(ValueError):
        load_settings(None, offers={"variant": "klein-2b"}).requirements()


def test_launch_spec_passes_worker_env_and_keeps_secrets_out_of_display(config_file, monkeypatch):
    monkeypatch.setenv("KLEIN_FLEET_WORKER__REGISTRY_TOKEN", "ghp_secret")
    s = load_settings(config_file)
    environ = {"AWS_ACCESS_KEY_ID": "AKIA123", "AWS_SECRET_ACCESS_KEY": "topsecret", "UNRELATED": "x"}
    spec = s.launch_spec(environ)
    assert spec.env == {
        "AWS_ACCESS_KEY_ID": "AKIA123",
        "AWS_SECRET_ACCESS_KEY": "topsecret",
        "MODEL": "klein-4b",
        "MAX_BATCH": "4",
        "QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/1/jobs",
        # The workers' /healthz, exposed so the fleet can ask whether they serve.
        "METRICS_PORT": "9100",
        "-p 9100:9100": "1",
    }
    assert spec.label == "prod" and spec.disk_gb == 60
    assert spec.image_login == "-u bot -p ghp_secret ghcr.io"
    shown = masked_env(spec.env)
    assert shown["AWS_SECRET_ACCESS_KEY"] == "***" and shown["AWS_ACCESS_KEY_ID"] == "***"
    assert shown["MODEL"] == "klein-4b" and shown["QUEUE_URL"].startswith("https://")
    assert "ghp_secret" not in repr(s) and "topsecret" not in repr(spec)


def test_every_gpu_worker_port_is_mapped_when_offers_may_have_several_gpus():
    s = load_settings(None, queue_url="https://q", image="ghcr.io/acme/w:1", offers={"max_gpus": 3})
    env = s.launch_spec({}).env
    assert env["METRICS_PORT"] == "9100"
    assert [k for k in env if k.startswith("-p ")] == ["-p 9100:9100", "-p 9101:9101", "-p 9102:9102"]


def test_the_placeholder_image_is_refused(monkeypatch):
    monkeypatch.delenv("KLEIN_FLEET_IMAGE", raising=False)
    s = load_settings(None, queue_url="https://sqs.us-east-1.amazonaws.com/1/jobs")
    with pytest.raises(ValueError, match="image: .*placeholder"):
        s.launch_spec({})
    assert (
        "METRICS_PORT"
        not in load_settings(None, queue_url="https://q", image="ghcr.io/acme/w:1", worker={"health_port": 0})
        .launch_spec({})
        .env
    )


@pytest.mark.parametrize(
    ("offers", "min_cuda"), [({}, 12.8), ({"cuda_flavour": "cu130"}, 13.0), ({"min_cuda": 12.6}, 12.6)]
)
def test_the_image_cuda_flavour_sets_the_driver_floor(offers, min_cuda):
    assert load_settings(None, offers=offers).requirements().min_cuda == min_cuda
    query = load_settings(None, offers=offers).requirements().to_query()
    assert query["cuda_max_good"] == {"gte": min_cuda}


def test_a_cuda_flavour_that_is_not_one_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match="cuda_flavour"):
        load_settings(None, offers={"cuda_flavour": "cuda13"})


def test_renting_needs_a_queue(monkeypatch):
    monkeypatch.delenv("QUEUE_URL", raising=False)
    with pytest.raises(ValueError, match="queue URL"):
        load_settings(None).launch_spec({})


def test_state_path_defaults_under_xdg_state_home(tmp_path):
    s = load_settings(None, fleet="blue")
    assert s.state_path({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "klein-fleet" / "blue.json"


# -- benchmark profiles -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"gpu": {"name": "NVIDIA H100 80GB HBM3"}, "images_per_second": 3.2}, 3.2),
        ({"gpu": {"name": "x"}, "seconds_per_image": 0.5}, 2.0),
        ({"gpu": {"name": "x"}, "latency": 0.25}, 4.0),
        ({"gpu": {"name": "x"}, "latency": {"1024x1024": 0.5, "512x512": 0.2}}, 2.0),  # 512² scales to 0.8 s
        (
            {
                "gpu": {"name": "x"},
                "measurements": [
                    {"width": 1024, "height": 1024, "latency_ms": 1000, "batch": 1},
                    {"width": 1024, "height": 1024, "seconds": 3.0, "batch_size": 4},  # 0.75 s per image
                    {"width": 2048, "height": 2048, "oom": True},
                    {"width": 1024, "height": 1024, "error": "cuda oom", "seconds": 0.1},
                ],
            },
            1 / 0.75,
        ),
        ({"gpu": {"name": "x"}, "measurements": {"1024x1024": {"median_s": 0.8}}}, 1.25),
        ({"gpu": {"name": "x"}, "measurements": []}, None),
        (  # the shape scripts/benchmark_vram.py writes (klein_facts/profile.py), trimmed
            {
                "schema_version": 1,
                "gpu": {"name": "NVIDIA GeForce RTX 4090", "total_bytes": 25_393_692_672},
                "variant": {"model": "klein-4b", "quantization": "none", "label": "klein-4b bf16"},
                "settings": {"steps": 4, "runs": 5, "reference_side": 1024},
                "resolutions": [
                    {"width": 512, "height": 512, "latency_s_median": 0.41, "oom": False},
                    {"width": 1024, "height": 1024, "latency_s_median": 1.25, "oom": False},
                    {"width": 2048, "height": 2048, "latency_s_median": None, "oom": True},
                ],
                "batches": [{"size": 4, "width": 1024, "height": 1024, "latency_s": 4.0, "oom": False}],
            },
            0.8,
        ),
        ({"gpu": {"name": "x"}, "batches": [{"size": 4, "latency_s": 2.0}]}, 2.0),
        ({"gpu": {"name": "cpu"}, "variant": {"model": "tiny"}, "latency": 0.1}, None),
    ],
)
def test_profile_throughput_is_read_tolerantly(payload, expected):
    got = BenchmarkProfile.model_validate(payload).throughput()
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_profile_directory_skips_what_it_cannot_read(tmp_path, caplog):
    (tmp_path / "h100.json").write_text(
        json.dumps({"gpu": {"name": "NVIDIA H100 80GB HBM3"}, "latency": 0.31})
    )
    (tmp_path / "h100-bf16.json").write_text(
        json.dumps({"gpu": {"name": "NVIDIA H100 80GB HBM3"}, "latency": 0.5})
    )
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "nogpu.json").write_text(json.dumps({"latency": 1.0}))
    (tmp_path / "nofigure.json").write_text(json.dumps({"gpu": {"name": "RTX 4090"}}))
    profiles = load_profiles(tmp_path)
    assert profiles == {"NVIDIA H100 80GB HBM3": pytest.approx(1 / 0.31)}
    assert caplog.text.count("skipping benchmark profile") == 3


def _offer(name: str, dlperf: float | None = 100.0, gpus: int = 1) -> Offer:
    return Offer(
        id=1,
        machine_id=1,
        host_id=1,
        gpu_name=name,
        num_gpus=gpus,
        gpu_ram_mb=81000,
        dph_total=2.0,
        dlperf=dlperf,
    )


def test_profiles_match_vast_gpu_names_and_dlperf_is_the_fallback():
    model = ThroughputModel(profiles={"NVIDIA H100 80GB HBM3": 3.0, "NVIDIA GeForce RTX 4090": 0.8})
    assert normalize_gpu_name("NVIDIA GeForce RTX 4090") == normalize_gpu_name("RTX 4090") == "rtx4090"
    assert model.for_offer(_offer("RTX 4090")).images_per_second == 0.8
    assert model.for_offer(_offer("H100 SXM", gpus=2)) == model.estimate(
        gpu_name="H100 SXM", num_gpus=2, dlperf=1
    )
    assert model.for_offer(_offer("H100 SXM", gpus=2)).images_per_second == 6.0
    fallback = model.for_offer(_offer("RTX 3090", dlperf=40.0))
    assert fallback.source == "dlperf estimate" and fallback.images_per_second == pytest.approx(0.4)
    assert model.for_offer(_offer("RTX 3090", dlperf=None)).source == "default estimate"


def test_ambiguous_model_token_is_not_guessed():
    model = ThroughputModel(profiles={"H100 PCIE": 2.0, "H100 SXM": 3.0})
    assert model.per_gpu_profile("H100 NVL") is None
    assert model.per_gpu_profile("H100 SXM") == 3.0


PROFILES = Path(__file__).resolve().parent.parent / "benchmarks" / "profiles"


def test_the_committed_h100_profiles_price_h100_offers():
    # benchmarks/profiles/ holds what a lent H100 measured; the CLI's profiles_dir can point there.
    profiles = load_profiles(PROFILES)
    # 4B BF16 at 0.518 s and 9B FP8 at 0.928 s per 1024x1024 image: unpinned, the faster counts.
    assert profiles == {"NVIDIA H100 80GB HBM3": pytest.approx(1 / 0.518, rel=0.01)}
    model = ThroughputModel(profiles=profiles)
    assert model.estimate(gpu_name="H100 SXM", num_gpus=2, dlperf=200).source == "profile"
    assert model.estimate(gpu_name="H100 SXM", num_gpus=2, dlperf=200).images_per_second == pytest.approx(
        2 / 0.518, rel=0.01
    )


@pytest.mark.parametrize(
    ("env", "seconds"),
    [
        ({"MODEL": "klein-9b"}, 0.928),  # the worker's default quantization for 9B is fp8
        ({"MODEL": "klein-9b", "QUANTIZATION": "fp8"}, 0.928),
        ({"MODEL": "klein-4b"}, 0.518),
        ({"MODEL": "auto"}, 0.518),  # nothing pinned, no opt-in: what the worker serves is 4B
        ({}, 0.518),
        # MODEL=auto with the non-commercial opt-in: the worker serves 9B (the largest model that fits),
        # so the fleet sizes on 9B's figure, not on the faster 4B one.
        ({"MODEL": "auto", "ALLOW_NON_COMMERCIAL": "true"}, 0.928),
        ({"ALLOW_NON_COMMERCIAL": "1"}, 0.928),
    ],
)
def test_the_fleet_sizes_on_the_profile_of_the_variant_it_deploys(env, seconds):
    # A 9B fleet sized on the 4B figure would rent ~45% too few workers.
    s = load_settings(policy={"profiles_dir": PROFILES}, worker={"env": env})
    estimate = s.throughput().estimate(gpu_name="H100 SXM", num_gpus=1, dlperf=200)
    assert estimate.source == "profile"
    assert estimate.images_per_second == pytest.approx(1 / seconds, rel=0.01)


def test_a_pinned_variant_without_a_profile_falls_back_to_the_estimate():
    s = load_settings(
        policy={"profiles_dir": PROFILES}, worker={"env": {"MODEL": "klein-4b", "QUANTIZATION": "fp8"}}
    )
    assert s.throughput().estimate(gpu_name="H100 SXM", num_gpus=1, dlperf=200).source == "dlperf estimate"
