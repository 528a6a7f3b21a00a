"""`python -m provisioning` end to end: fake Vast API + moto SQS, through the real CLI."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import boto3
import pytest
from moto.server import ThreadedMotoServer
from typer.testing import CliRunner

from provisioning.cli import app
from tests.fake_vast import IMAGE

_names = itertools.count()
SECRET = "supersecretvalue"


@pytest.fixture(scope="module")
def sqs_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def queue(sqs_endpoint):
    client = boto3.client("sqs", endpoint_url=sqs_endpoint, region_name="us-east-1")
    url = client.create_queue(QueueName=f"cli-{next(_names)}")["QueueUrl"]

    def fill(count: int) -> str:
        for start in range(0, count, 10):
            entries = [{"Id": str(k), "MessageBody": "{}"} for k in range(min(10, count - start))]
            client.send_message_batch(QueueUrl=url, Entries=entries)
        return url

    return fill


@pytest.fixture
def cli(fake, sqs_endpoint, tmp_path):
    env = {
        "VAST_API_URL": fake.url,
        "VAST_API_KEY": fake.api_key,
        "AWS_ENDPOINT_URL": sqs_endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "HF_TOKEN": "hf_" + SECRET,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "KLEIN_FLEET_IMAGE": IMAGE,
        "KLEIN_FLEET_WORKER__HEALTH_PORT": "0",  # readiness probing has its own tests
        "QUEUE_URL": "",
        "COLUMNS": "240",
    }
    runner = CliRunner()

    def invoke(*args: str, code: int = 0, **extra_env: str) -> str:
        result = runner.invoke(app, list(args), env={**env, **extra_env})
        assert result.exit_code == code, result.output
        return result.output

    return invoke


def test_help_lists_every_command(cli):
    out = cli("--help")
    for command in ("offers", "status", "scale", "autoscale", "destroy", "simulate"):
        assert command in out


def test_offers_are_ranked_by_cost_per_image(cli, fake):
    pricey = fake.add_offer(gpu_name="RTX 5090", gpu_ram=32607, dph_total=0.90, dlperf=110)
    cheap = fake.add_offer(gpu_name="RTX 4090", dph_total=0.35, dlperf=80)
    fake.add_offer(gpu_name="RTX 3060", gpu_ram=12288, dph_total=0.05)  # too small for klein-4B BF16
    out = cli("offers")
    assert out.index(f" {cheap} ") < out.index(f" {pricey} ")
    assert "RTX 3060" not in out and "dlperf estimate" in out


def test_status_shows_backlog_fleet_desired_and_strangers(cli, fake, queue):
    url = queue(30)
    fake.add_offer()
    fake.add_instance(label="klein", image_uuid=IMAGE, actual_status="running", start_date=fake.clock() - 99)
    fake.add_instance(label="klein", image_uuid="someone/else:1", actual_status="running")
    out = cli("status", "--queue-url", url)
    assert "Backlog" in out and " 30 " in out
    assert "Fleet by state" in out and "running" in out
    assert "Desired size" in out and "target wait" in out
    assert "unknown instance" in out and "someone/else:1" in out
    assert fake.mutations() == []


def test_autoscale_dry_run_prints_actions_and_changes_nothing(cli, fake, queue, tmp_path):
    url = queue(200)
    for price in (0.30, 0.32, 0.35):
        fake.add_offer(dph_total=price)
    fake.add_instance(label="klein", image_uuid=IMAGE, actual_status="exited")
    out = cli("autoscale", "--once", "--dry-run", "--queue-url", url)
    assert "dry run: nothing changed" in out
    assert out.count("dry run") >= 4  # one destroy (exited) and three rents
    assert "exited" in out and "AWS_SECRET_ACCESS_KEY=***" in out and "HF_TOKEN=***" in out
    assert SECRET not in out
    assert fake.mutations() == []
    assert not (tmp_path / "state").exists()


def test_autoscale_once_rents_and_remembers(cli, fake, queue, tmp_path):
    url = queue(100)
    for price in (0.30, 0.32):
        fake.add_offer(dph_total=price)
    out = cli("autoscale", "--once", "--queue-url", url, "--max", "2")
    assert out.count("rented: instance") == 2
    assert len(fake.instances) == 2 and {b["label"] for b in fake.rent_bodies} == {"klein"}
    assert fake.rent_bodies[0]["env"]["QUEUE_URL"] == url
    assert fake.rent_bodies[0]["env"]["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert (tmp_path / "state" / "klein-fleet" / "klein.json").is_file()


def test_fleet_options_work_before_and_after_the_command(cli, fake, queue):
    url = queue(500)
    for _ in range(4):
        fake.add_offer()
    before = cli("--max", "1", "autoscale", "--once", "--dry-run", "--queue-url", url)
    after = cli("autoscale", "--once", "--dry-run", "--queue-url", url, "--max", "1")
    assert "desired 1" in before and "desired 1" in after


def test_scale_to_n_and_back(cli, fake, queue):
    url = queue(0)
    for _ in range(3):
        fake.add_offer()
    out = cli("scale", "--to", "2", "--dry-run", "--queue-url", url)
    assert out.count("dry run") >= 2 and fake.mutations() == []
    cli("scale", "--to", "2", "--queue-url", url)
    assert len(fake.instances) == 2
    out = cli("scale", "--to", "0", "--queue-url", url)
    assert out.count("destroyed") == 2 and fake.instances == {}


def test_scale_to_n_stops_into_the_cold_pool_and_resumes_before_renting(cli, fake, queue, tmp_path):
    url = queue(0)
    fake.add_offer()
    ids = [
        fake.add_instance(
            label="klein", image_uuid=IMAGE, actual_status="running", start_date=fake.clock() - 60
        )
        for _ in range(5)
    ]
    # A pool floor of 1, but cold_mult 2.5 over --max 5: everything leaving fits, nothing is destroyed.
    pool = ("--cold-pool", "1", "--cold-mult", "2.5", "--max", "5")
    out = cli(*pool, "scale", "--to", "1", "--queue-url", url)
    assert out.count("destroyed") == 0 and sorted(fake.instances) == sorted(ids)
    stopped = [i for i in ids if fake.instances[i]["actual_status"] == "stopped"]
    assert len(stopped) == 4
    out = cli(*pool, "scale", "--to", "3", "--queue-url", url)
    assert fake.rent_bodies == []  # resumed, not rented
    assert sum(fake.instances[i]["intended_status"] == "running" for i in ids) == 3
    # Taken back while still resuming: stopped into the pool again, not left running nor destroyed.
    out = cli(*pool, "scale", "--to", "1", "--queue-url", url)
    assert out.count("destroyed") == 0 and len(fake.instances) == 5
    assert sum(fake.instances[i]["intended_status"] == "running" for i in ids) == 1
    state = json.loads((tmp_path / "state" / "klein-fleet" / "klein.json").read_text())
    assert state["resumed"] == {} and len(state["cold_since"]) == 4
    cli(*pool, "scale", "--to", "3", "--queue-url", url)
    assert fake.rent_bodies == []
    fake.boot_all()  # the resumed ones run again
    # Without cold_mult the floor rules: one of the two cold ones stays, the three running are destroyed.
    out = cli("--cold-pool", "1", "--cold-mult", "0", "scale", "--to", "0", "--queue-url", url)
    assert out.count("destroyed") == 4 and [r["actual_status"] for r in fake.instances.values()] == [
        "stopped"
    ]


def test_destroy_all(cli, fake):
    ours = [fake.add_instance(label="klein", image_uuid=IMAGE) for _ in range(3)]
    stranger = fake.add_instance(label="klein", image_uuid="someone/else:1")
    fake.add_instance(label="other", image_uuid=IMAGE)
    assert "--all" in cli("destroy", code=2)
    out = cli("destroy", "--all", "--dry-run")
    assert out.count("dry run") >= 3 and fake.mutations() == []
    out = cli("destroy", "--all")
    assert out.count("destroyed") == 3 and "left alone" in out
    assert set(fake.instances) == {stranger, max(fake.instances)} and not set(ours) & set(fake.instances)


def test_simulate_builtin_and_csv(cli, tmp_path):
    out = cli("simulate", "--trace", "step", "--duration", "3600", "--max", "10")
    assert "wait p95 s" in out and "static" in out and "rents / destroys" in out
    trace = tmp_path / "arrivals.csv"
    trace.write_text("t\n" + "\n".join(str(k * 0.5) for k in range(2000)))
    data = json.loads(cli("simulate", "--trace", str(trace), "--json"))
    assert data["jobs"] == 2000 and [r["name"] for r in data["results"]][0] == "policy"
    equal = data["static_equal_p95"]
    assert set(equal) == {"cost_usd", "wait_p95_s", "size", "gpu"}
    assert equal["wait_p95_s"] <= data["results"][0]["wait_p95_s"] + 1e-6 and equal["size"] >= 1
    assert "neither a file" in cli("simulate", "--trace", "nope", code=2)


def test_clear_errors_for_missing_key_and_bad_config(cli, tmp_path):
    assert "VAST_API_KEY" in cli("destroy", "--all", code=2, VAST_API_KEY="")
    assert "VAST_API_KEY" in cli("autoscale", "--once", "--queue-url", "http://q", code=2, VAST_API_KEY="")
    bad = tmp_path / "bad.toml"
    bad.write_text("max_instances = 'many'\n")
    assert "configuration" in cli("--config", str(bad), "status", code=2)
    assert "queue URL is needed" in cli("autoscale", "--once", code=2)


def test_cli_import_pulls_in_no_torch_and_no_worker():
    code = (
        "import sys, provisioning.cli, provisioning.__main__\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'worker', 'handlers')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rented_workers_get_their_price_per_hour(cli, fake, queue):
    url = queue(100)
    fake.add_offer(dph_total=0.30)
    fake.add_offer(dph_total=0.80, num_gpus=2, gpu_ram=24576)
    cli("autoscale", "--once", "--queue-url", url, "--max", "2", KLEIN_FLEET_OFFERS__MAX_GPUS="2")
    prices = sorted(float(body["env"]["PRICE_PER_HOUR"]) for body in fake.rent_bodies)
    # Each worker's share: a 2-GPU instance runs one worker per GPU, each charged half its price.
    assert prices == [0.30, 0.40]


def test_several_queues_from_the_toml_status_per_queue_and_rent_with_queue_urls(
    cli, fake, queue, sqs_endpoint, tmp_path
):
    high = queue(12)
    client = boto3.client("sqs", endpoint_url=sqs_endpoint, region_name="us-east-1")
    low = client.create_queue(QueueName=f"cli-low-{next(_names)}")["QueueUrl"]
    config = tmp_path / "fleet.toml"
    config.write_text(
        f'[[queues]]\nurl = "{high}"\ntarget_wait_s = 30\n\n[[queues]]\nurl = "{low}"\n', encoding="utf-8"
    )
    out = cli("--config", str(config), "status")
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ cli-")}
    assert [name for name in rows] == [high.rsplit("/", 1)[-1], low.rsplit("/", 1)[-1]]
    assert " 12 " in rows[high.rsplit("/", 1)[-1]] and "30s" in rows[high.rsplit("/", 1)[-1]]
    assert "total" in out
    fake.add_offer(dph_total=0.30)
    cli("--config", str(config), "autoscale", "--once", "--max", "1")
    (body,) = fake.rent_bodies
    assert body["env"]["QUEUE_URLS"] == f"{high},{low}" and "QUEUE_URL" not in body["env"]
    both = cli("--config", str(config), "status", "--queue-url", high, code=2)
    assert "not both" in both


def test_autoscale_stops_into_the_cold_pool_resumes_it_and_status_shows_it(cli, fake, queue, tmp_path):
    fast = {"KLEIN_FLEET_POLICY__SCALE_IN_AFTER_S": "0", "KLEIN_FLEET_POLICY__MIN_INSTANCE_AGE_S": "0"}
    ids = [
        fake.add_instance(
            label="klein", image_uuid=IMAGE, actual_status="running", start_date=fake.clock() - 900
        )
        for _ in range(3)
    ]
    empty = queue(0)
    out = cli("--cold-pool", "1", "--cold-mult", "0", "autoscale", "--once", "--queue-url", empty, **fast)
    assert out.count("stopped") >= 1 and out.count("destroyed") == 2
    (cold,) = fake.instances
    assert cold in ids and fake.instances[cold]["actual_status"] == "stopped"
    out = cli("status", "--queue-url", empty, **fast)
    assert "cold" in out and "0.010" in out  # the pool shows, billed for its disk alone
    state = json.loads((tmp_path / "state" / "klein-fleet" / "klein.json").read_text())
    assert str(cold) in state["cold_since"]
    fake.add_offer()
    out = cli("autoscale", "--once", "--queue-url", queue(40), **fast)
    assert "resume" in out and fake.instances[cold]["intended_status"] == "running"
    assert fake.rent_bodies == []  # resumed, not rented
    state = json.loads((tmp_path / "state" / "klein-fleet" / "klein.json").read_text())
    assert str(cold) in state["resumed"] and state["cold_since"] == {}


def test_a_mistyped_log_level_is_a_usage_error_naming_the_option(cli):
    out = cli("--log-level", "debugg", "status", code=2)
    assert "--log-level" in out and "'debugg' is not one of" in out
    assert "Traceback" not in out
    assert "Usage:" in cli("--log-level", "debug", "simulate", "--help")  # any case is accepted


def test_an_unpullable_image_holds_rents_across_ticks_until_retried_or_changed(cli, fake, queue):
    for _ in range(4):
        fake.add_offer()
    busy = queue(30)

    def unpullable() -> int:
        iid = fake.add_instance(
            label="klein", image_uuid=IMAGE, actual_status="loading", start_date=fake.clock()
        )
        fake.set_status(iid, "loading", f"Error response from daemon: manifest for {IMAGE} not found")
        return iid

    bad = unpullable()
    out = cli("autoscale", "--once", "--queue-url", busy)
    assert "rents held" in out and "not found" in out and bad not in fake.instances
    # The unpullable instance is gone, but a rent would pull the same image: still held, and said so.
    out = cli("autoscale", "--once", "--queue-url", busy)
    assert "rents held" in out and "--retry-image" in out and fake.rent_bodies == []
    assert "rents held" in cli("status", "--queue-url", busy)
    assert "rents held" in cli("autoscale", "--once", "--dry-run", "--queue-url", busy)
    # Another image is not held: the hold is kept per image.
    out = cli("autoscale", "--once", "--queue-url", busy, "--max", "1", KLEIN_FLEET_IMAGE=IMAGE + "-fixed")
    assert "rents held" not in out and [b["image"] for b in fake.rent_bodies] == [IMAGE + "-fixed"]
    # Held again for the same image; the operator fixes it (same tag) and says so: rents resume.
    for iid in list(fake.instances):
        del fake.instances[iid]
    unpullable()
    assert "rents held" in cli("autoscale", "--once", "--queue-url", busy)
    assert "rents held" in cli("autoscale", "--once", "--queue-url", busy) and len(fake.rent_bodies) == 1
    out = cli("autoscale", "--once", "--queue-url", busy, "--retry-image")
    assert "rents held" not in out and len(fake.rent_bodies) > 1
    assert all(b["image"] == IMAGE for b in fake.rent_bodies[1:])
