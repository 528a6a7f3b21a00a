"""The Vast API as the official `vastai` client speaks it: each fault against the fake Vast server."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from provisioning.cli import app
from provisioning.config import FleetSettings, load_settings
from provisioning.models import QueueSample
from provisioning.offers import OfferRequirements
from provisioning.policy import Observation, PolicyConfig, decide
from provisioning.reconcile import Reconciler
from provisioning.throughput import ThroughputModel
from provisioning.vast import LaunchSpec, VastAuthError, VastClient, VastError
from tests.fake_vast import IMAGE, FakeVast
from worker.vast_self import destroy_own_instance

SPEC = LaunchSpec(image=IMAGE, label="klein", env={"QUEUE_URL": "https://sqs.example/q"})
POLICY = PolicyConfig(image=IMAGE, max_instances=4, max_hourly_usd=2.0, target_wait_s=120)


def test_destroy_answered_200_with_success_false_is_a_failure(fake, client):
    iid = fake.add_instance(label="klein", image_uuid=IMAGE, actual_status="running")
    fake.refuse(iid, "Instance is locked")
    with pytest.raises(VastError, match="Instance is locked"):
        client.destroy_instance(iid)
    assert iid in fake.instances


def test_failed_destroy_is_not_counted_as_gone_so_no_replacement_breaks_the_cap(fake, client):
    # Over the cap: one instance must go. Its destroy is refused with 200 + success:false, so the $/h it
    # costs is still spent and no rent may be made on top of it.
    fake.add_offer(dph_total=0.9)
    iid = fake.add_instance(label="klein", image_uuid=IMAGE, actual_status="exited", dph_total=1.5)
    fake.refuse(iid)
    now = fake.clock()
    obs = Observation(
        now=now,
        samples=[QueueSample(at=now, visible=50, in_flight=0)],
        instances=client.list_instances(label="klein"),
        offers=client.search_offers(OfferRequirements().to_query()),
    )
    decision = decide(obs, config=POLICY, requirements=OfferRequirements(), throughput=ThroughputModel())
    assert [d.instance.id for d in decision.destroys] == [iid] and decision.rents
    report = Reconciler(client=client, launch=SPEC, max_hourly_usd=2.0).apply(decision, dry_run=False)
    assert report.actions[0].outcome.startswith("failed") and "locked" in report.actions[0].outcome
    assert report.actions[1].outcome.startswith("skipped: over the $2.00/h cap")
    assert fake.rent_bodies == [] and report.hourly_after == pytest.approx(1.5)


def test_state_change_answered_success_false_is_a_failure(fake, client):
    iid = fake.add_instance(label="klein", image_uuid=IMAGE, actual_status="running")
    client.set_state(iid, "stopped")
    assert fake.instances[iid]["actual_status"] == "stopped"
    assert fake.requests[-1] == ("PUT", f"/api/v0/instances/{iid}/", {"state": "stopped"})
    fake.refuse(iid, "resume not allowed")
    with pytest.raises(VastError, match="resume not allowed"):
        client.set_state(iid, "running")


def test_worker_self_destroy_treats_success_false_as_failure(fake, caplog):
    iid = fake.add_instance(label="klein")
    fake.refuse(iid, "Instance is locked")
    assert destroy_own_instance(api_url=fake.url, container_id=str(iid), api_key=fake.api_key) is False
    assert "Instance is locked" in caplog.text and iid in fake.instances
    fake._refused.clear()
    assert destroy_own_instance(api_url=fake.url, container_id=str(iid), api_key=fake.api_key) is True
    assert iid not in fake.instances
    # No key: no request with an empty bearer token at all.
    sent = len(fake.requests)
    assert destroy_own_instance(api_url=fake.url, container_id=str(iid), api_key="") is False
    assert len(fake.requests) == sent


def test_no_key_sends_no_empty_bearer_header(fake):
    with pytest.raises(VastAuthError):
        VastClient(api_key="", api_url=fake.url).list_instances()
    assert fake.auth_headers == [None]


@pytest.mark.parametrize(
    ("key", "status", "msg"), [("wrong", 401, "Invalid user key"), ("ro", 403, "read-only")]
)
def test_refused_key_names_the_reply_and_the_key_source(fake, key, status, msg):
    fake.forbidden_keys["ro"] = "read-only key cannot rent"
    bad = VastClient(api_key=key, api_url=fake.url, key_source="/home/op/.config/vastai/vast_api_key")
    with pytest.raises(VastAuthError) as err:
        bad.create_instance(fake.add_offer(), SPEC)
    assert err.value.status == status and msg in str(err.value)
    text = str(err.value)
    assert "/home/op/.config/vastai/vast_api_key" in text and f"{key} " not in text
    assert len([r for r in fake.requests if r[0] == "PUT"]) == 1  # not retried, no next offer tried


def _cli_env(fake: FakeVast, tmp_path, **extra: str) -> dict[str, str]:
    return {
        "VAST_API_URL": fake.url,
        "HOME": str(tmp_path),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "KLEIN_FLEET_IMAGE": IMAGE,
        "QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123/q",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing listens: the queue is never reached
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "COLUMNS": "240",
        **extra,
    }


def test_autoscale_with_a_refused_key_exits_nonzero_with_the_message(fake, tmp_path):
    for _ in range(3):
        fake.add_offer()
    env = _cli_env(fake, tmp_path, VAST_API_KEY="wrong-key")
    result = CliRunner().invoke(app, ["autoscale", "--interval", "0.01"], env=env)
    assert result.exit_code == 1, result.output
    assert "Invalid user key" in result.output and "VAST_API_KEY" in result.output
    assert "Traceback" not in result.output and "wrong-key" not in result.output
    assert not [r for r in fake.requests if r[0] == "PUT"]  # no offer walked


def test_key_saved_by_the_official_client_is_read_when_the_env_has_none(fake, tmp_path, monkeypatch):
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    saved = tmp_path / ".config" / "vastai" / "vast_api_key"
    saved.parent.mkdir(parents=True)
    saved.write_text(fake.api_key + "\n")
    key, source = FleetSettings().api_key(home=tmp_path)
    assert (key, source) == (fake.api_key, str(saved))
    env = _cli_env(fake, tmp_path)
    env.pop("QUEUE_URL")
    result = CliRunner().invoke(app, ["destroy", "--all"], env={**env, "VAST_API_KEY": ""})
    assert result.exit_code == 0, result.output
    assert fake.auth_headers and set(fake.auth_headers) == {f"Bearer {fake.api_key}"}


def test_onstart_in_the_args_mode_is_refused(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('[worker]\nruntype = "args"\nonstart = "klein-vast-onstart"\n')
    with pytest.raises(ValueError, match="worker.onstart"):
        load_settings(path)
    path.write_text('[worker]\nruntype = "ssh"\nonstart = "klein-vast-onstart"\n')
    assert load_settings(path).worker.onstart == "klein-vast-onstart"


def test_offer_query_keeps_the_best_cost_per_image_beyond_the_100_cheapest_per_hour(fake, client):
    for _ in range(150):
        fake.add_offer(gpu_name="RTX 3090", dph_total=0.20, dlperf=10.0)  # cheap per hour, slow
    fast = fake.add_offer(gpu_name="H100 SXM", gpu_ram=81559, dph_total=1.50, dlperf=400.0)
    offers = client.search_offers(OfferRequirements().to_query())
    assert fast in {o.id for o in offers}


def test_reliability_filtered_on_is_the_one_read(fake, client):
    # The server has two fields; the query and the local check must agree on one.
    shaky = fake.add_offer(reliability=0.90, reliability2=0.999)
    good = fake.add_offer(reliability=0.995, reliability2=0.90)
    offers = client.search_offers(OfferRequirements().to_query())
    assert [o.id for o in offers] == [good] and offers[0].reliability == 0.995
    assert shaky in fake.offers  # filtered out by the server on "reliability", as the query asked


def test_row_without_start_date_is_booting_not_stuck(fake, client, tmp_path):
    from provisioning.autoscale import Autoscaler
    from provisioning.state import StateFile

    iid = fake.add_instance(label="klein", image_uuid=IMAGE, actual_status=None, start_date=None)
    listed = client.list_instances(label="klein")
    assert listed[0].started_at is None
    clock = [fake.clock()]
    scaler = Autoscaler(
        vast=client,
        backlog=None,
        label="klein",
        policy=POLICY,
        requirements=OfferRequirements(),
        throughput=ThroughputModel(),
        reconciler=None,
        state=StateFile(path=tmp_path / "state.json"),
        clock=lambda: clock[0],
    )
    _, decision = scaler.plan()
    assert str(decision.phases[iid]) == "booting" and decision.destroys == ()
    # Still undated past the boot deadline counted from when it was first listed: stuck, replaced.
    clock[0] += POLICY.boot_deadline_s + 1
    _, later = scaler.plan()
    assert [(d.instance.id, d.reason) for d in later.destroys] == [(iid, "stuck")]
