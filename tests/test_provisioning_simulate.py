"""Arrival traces and the simulator's bookkeeping (the closed-loop policy runs are in the policy tests)."""

from __future__ import annotations

import pytest

from provisioning.catalog import CATALOG
from provisioning.offers import OfferRequirements
from provisioning.policy import PolicyConfig
from provisioning.simulate import SimConfig, compare, simulate_static
from provisioning.traces import generate, load_trace, read_csv

POLICY = PolicyConfig(image="sim", max_instances=20, max_hourly_usd=6.0, target_wait_s=120)
REQUIREMENTS = OfferRequirements(max_price_per_gpu_hour=1.0)
RTX_4090 = next(m for m in CATALOG if m.name == "RTX 4090")


def test_csv_trace_accepts_seconds_epochs_iso_and_a_header(tmp_path):
    path = tmp_path / "arrivals.csv"
    path.write_text("timestamp,job\n1700000010,a\n1700000000,b\n\n# comment\n1700000005.5,c\n")
    assert read_csv(path) == [0.0, 5.5, 10.0]
    iso = tmp_path / "iso.csv"
    iso.write_text("2026-11-22T12:00:00Z\n2026-11-22T12:00:30+00:00\n")
    assert read_csv(iso) == [0.0, 30.0]
    bad = tmp_path / "bad.csv"
    bad.write_text("1\nsoon\n")
    with pytest.raises(ValueError, match="bad.csv:2"):
        read_csv(bad)
    with pytest.raises(FileNotFoundError):
        load_trace(str(tmp_path / "missing.csv"))


def test_builtin_patterns_are_repeatable_and_shaped():
    step = generate("step", duration_s=4 * 3600, seed=5)
    assert step == generate("step", duration_s=4 * 3600, seed=5)
    quiet = sum(1 for t in step if t < 3600)
    busy = sum(1 for t in step if 3600 <= t < 7200)
    assert 500 < quiet < 950 and 6500 < busy < 7900  # 0.2/s then 2.0/s
    burst = generate("burst", duration_s=3600, seed=5)
    assert sum(1 for t in burst if 600 <= t < 720) > 1300  # ~1500 jobs in the 2-minute burst
    assert generate("sine", duration_s=3600, seed=1) != generate("sine", duration_s=3600, seed=2)


def test_static_fleet_serves_fifo_and_bills_by_the_hour():
    arrivals = [float(t) for t in range(0, 600, 2)]  # 0.5 jobs/s for 10 minutes
    result = simulate_static(arrivals, model=RTX_4090, count=1, sim=SimConfig(tick_s=60))
    assert result.jobs == 300 and result.unserved == 0
    assert result.wait_max_s == 0.0  # 1.33 s per job, one every 2 s: never a queue
    assert result.gpu_hours == pytest.approx(result.duration_s / 3600)
    assert result.cost_usd == pytest.approx(result.gpu_hours * RTX_4090.price_per_hour)
    overloaded = simulate_static([0.0] * 90, model=RTX_4090, count=1, sim=SimConfig(tick_s=60))
    assert overloaded.wait_max_s == pytest.approx(89 / RTX_4090.images_per_second)
    assert overloaded.max_backlog == 90 - 45  # sampled at 60 s: 45 jobs started (one per 1.33 s)


def test_compare_sizes_the_static_fleet_to_the_same_cost():
    arrivals = generate("step", duration_s=3 * 3600, seed=4)
    policy, static = compare(arrivals, policy=POLICY, requirements=REQUIREMENTS, sim=SimConfig(seed=4))
    assert policy.jobs == static.jobs == len(arrivals)
    assert policy.rents > 0 and policy.destroys > 0 and static.rents == 0
    # Whole instances: the static fleet costs within one instance's share of the policy's cost.
    one_instance = RTX_4090.price_per_hour * static.duration_s / 3600
    assert abs(static.cost_usd - policy.cost_usd) <= one_instance
    assert policy.peak_hourly_usd <= POLICY.max_hourly_usd + 1e-9


def test_stuck_boots_are_replaced_in_simulation():
    arrivals = generate("sine", duration_s=2 * 3600, seed=9)
    sim = SimConfig(seed=9, stuck_probability=0.5)
    policy, _ = compare(arrivals, policy=POLICY, requirements=REQUIREMENTS, sim=sim)
    assert policy.unserved == 0 and policy.destroys >= 1
