"""Where one image's time goes between the GPU's kernels, for ``scripts/bench_gpu.py --profile``.

Issue 10 counts ~35 ms of pipeline glue per 4B 1024x1024 image on an H100, outside the three
models; the stage timer (measurement/stage_timing.py) can say how much, not what. One engine call
runs under ``torch.profiler`` (host and CUDA activity) after a warm call, and the report keeps:

- ``wall_ms``: the call, host clock;
- ``device_busy_ms``: the union of the GPU's kernel and copy intervals, so ``device_idle_ms`` is
  when the GPU waited on the host (launch overhead, a synchronisation, Python between the models);
- ``syncs``: how often the host waited on the device (``aten::item``/``_local_scalar_dense``, stream
  and device synchronisations, device-to-host copies), the usual cause of idle gaps;
- ``top_host_ops``: the host operations with the most self time.

The profiler's full table is written beside the JSON (``*.profile.txt``). On a CPU (``--smoke``)
there is no device activity: the figures check the code, they mean nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# Host-side names of a host waiting on the device.
SYNC_OPS = (
    "aten::item",
    "aten::_local_scalar_dense",
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
)
TOP_ROWS = 20


def profile_call(call: Callable[[], Any], device: torch.device, table_path: Path | None) -> dict[str, Any]:
    """Profile one ``call`` (after one unprofiled warm call) and summarise it (module docstring)."""
    call()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - started) * 1000
    events = prof.events()
    busy_ms = _union_ms(
        [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    )
    averages = prof.key_averages()
    syncs = {row.key: row.count for row in averages if row.key in SYNC_OPS}
    syncs["device_to_host_copies"] = sum(1 for e in events if "DtoH" in e.name or "Device -> Host" in e.name)
    host_rows = sorted(averages, key=lambda row: row.self_cpu_time_total, reverse=True)[:TOP_ROWS]
    if table_path is not None:
        table_path.write_text(averages.table(sort_by="self_cpu_time_total", row_limit=60))
    return {
        "wall_ms": round(wall_ms, 2),
        "device_busy_ms": round(busy_ms, 2),
        "device_idle_ms": round(max(wall_ms - busy_ms, 0.0), 2) if device.type == "cuda" else None,
        "syncs": syncs,
        "top_host_ops": [
            {"op": row.key, "calls": row.count, "self_host_ms": round(row.self_cpu_time_total / 1000, 3)}
            for row in host_rows
        ],
    }


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals in microseconds, in milliseconds."""
    total = 0.0
    end = float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1000
