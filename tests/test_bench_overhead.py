"""scripts/bench_overhead.py: the runner it measures really runs with the concurrency asked for."""

from __future__ import annotations

import os

from measurement.overhead import bench_overhead


def test_the_overhead_row_runs_one_job_at_a_time() -> None:
    saved = dict(os.environ)
    try:
        report = bench_overhead(2, 256, concurrency=1)
    finally:  # the script exports its stack's endpoint and queues into the environment
        os.environ.clear()
        os.environ.update(saved)

    # JOB_CONCURRENCY defaults to 2: the row labelled "one at a time" used to run with that.
    assert report["concurrency"] == 1
    assert report["jobs"] == 2 and report["jobs_per_s"] > 0
    assert report["overhead_ms_median"] > 0
