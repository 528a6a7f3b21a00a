"""The simulator's jobs and GPUs: a FIFO queue served by whichever worker frees first, and instances that
boot, serve, stop into the cold pool, resume and are destroyed, billed as Vast bills them.

Billing: the GPU price from the container running (boot done) to a stop or destroy, whether or not its
worker serves; the disk's storage price while stopped. The disk charge while running is left out (cents
a day). A stopped or destroyed worker finishes the job in hand (the SIGTERM drain) and takes no more.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from provisioning.catalog import GpuModel
from provisioning.models import Instance, QueueSample


@dataclass(slots=True, kw_only=True)
class Box:
    id: int
    model: GpuModel
    price: float
    storage_price: float
    machine_id: int
    host_id: int
    rented_at: float
    running_at: float | None  # container up (billed from here); None: stuck loading, never runs
    ready_at: float | None  # worker serves from here; None: never (stuck, or an unhealthy worker)
    destroyed_at: float | None = None
    stopped_at: float | None = None  # in the cold pool since
    resume_hangs: bool = False  # the last resume waits for a GPU someone else took
    gen: int = 0  # bumped on stop: queue entries of an older generation are stale
    billed_s: float = 0.0  # GPU seconds of closed running intervals
    stored_s: float = 0.0  # seconds of closed stopped intervals

    def close_running(self, t: float) -> None:
        if self.running_at is not None and self.running_at < t:
            self.billed_s += t - self.running_at
        self.running_at = None

    def cost(self, t: float) -> tuple[float, float]:
        """(GPU-hours, $) up to ``t``."""
        run = self.billed_s + (max(0.0, t - self.running_at) if self.running_at is not None else 0.0)
        stored = self.stored_s + (t - self.stopped_at if self.stopped_at is not None else 0.0)
        return run / 3600.0, run / 3600.0 * self.price + stored / 3600.0 * self.storage_price

    def hourly(self, t: float) -> float:
        return self.storage_price if self.stopped_at is not None else self.price


class Cluster:
    """Jobs and GPUs over time."""

    def __init__(self, arrivals: Sequence[float], *, images_per_job: float) -> None:
        self._arrivals = arrivals
        self._next = 0
        self._images = images_per_job
        self.queue: deque[float] = deque()
        self._workers: list[tuple[float, int, Box, int]] = []  # (free at, tie-break, instance, gen)
        self._in_service: list[float] = []  # end times
        self._seq = 0
        self.waits: list[float] = []
        self.boxes: list[Box] = []

    def add(self, box: Box) -> None:
        self.boxes.append(box)
        self.serve_from(box)

    def serve_from(self, box: Box) -> None:
        if box.ready_at is not None:
            self._seq += 1
            heapq.heappush(self._workers, (box.ready_at, self._seq, box, box.gen))

    def stop(self, box: Box, t: float) -> None:
        box.close_running(t)
        box.stopped_at, box.ready_at = t, None
        box.gen += 1

    def resume(self, box: Box, t: float, *, resume_s: float, hangs: bool) -> None:
        if box.stopped_at is not None:
            box.stored_s += t - box.stopped_at
        box.stopped_at, box.resume_hangs = None, hangs
        if not hangs:
            box.running_at, box.ready_at = t + resume_s, t + resume_s
            self.serve_from(box)

    def destroy(self, box: Box, t: float) -> None:
        box.close_running(t)
        if box.stopped_at is not None:
            box.stored_s += t - box.stopped_at
            box.stopped_at = None
        box.destroyed_at = t

    def _usable(self, entry: tuple[float, int, Box, int]) -> bool:
        box = entry[2]
        return box.destroyed_at is None and box.stopped_at is None and entry[3] == box.gen

    def run_until(self, t1: float) -> None:
        """Serve jobs FIFO with whichever worker frees first, for every start before ``t1``."""
        while True:
            if not self.queue:
                if self._next < len(self._arrivals) and self._arrivals[self._next] < t1:
                    self.queue.append(self._arrivals[self._next])
                    self._next += 1
                else:
                    break
            # Stops and destroys happen at ticks and time only moves forward: drop their workers.
            while self._workers and not self._usable(self._workers[0]):
                heapq.heappop(self._workers)
            if not self._workers:
                break
            free_at, _, box, gen = self._workers[0]
            start = max(free_at, self.queue[0])
            if start >= t1:
                break
            heapq.heappop(self._workers)
            self.waits.append(start - self.queue.popleft())
            end = start + self._images / box.model.images_per_second
            self._seq += 1
            heapq.heappush(self._workers, (end, self._seq, box, gen))
            heapq.heappush(self._in_service, end)
        while self._next < len(self._arrivals) and self._arrivals[self._next] < t1:
            self.queue.append(self._arrivals[self._next])
            self._next += 1

    def sample(self, t: float) -> QueueSample:
        while self._in_service and self._in_service[0] <= t:
            heapq.heappop(self._in_service)
        return QueueSample(at=t, visible=len(self.queue), in_flight=len(self._in_service))

    def done(self) -> bool:
        return self._next >= len(self._arrivals) and not self.queue and not self._in_service

    def alive(self) -> list[Box]:
        return [b for b in self.boxes if b.destroyed_at is None]

    def instances(self, t: float, image: str) -> list[Instance]:
        return [_instance(b, t, image) for b in self.alive()]

    def ready(self, t: float) -> list[int]:
        """Ids whose worker answers /healthz now."""
        return [b.id for b in self.alive() if b.ready_at is not None and b.ready_at <= t]


def _instance(b: Box, t: float, image: str) -> Instance:
    if b.stopped_at is not None:
        status, intended = "stopped", "stopped"
    elif b.resume_hangs:
        status, intended = "scheduling", "running"
    elif b.running_at is not None and b.running_at <= t:
        status, intended = "running", "running"
    else:
        status, intended = "loading", "running"
    return Instance(
        id=b.id,
        label="sim",
        image=image,
        machine_id=b.machine_id,
        host_id=b.host_id,
        gpu_name=b.model.name,
        num_gpus=1,
        dph_total=b.price,
        actual_status=status,
        intended_status=intended,
        status_msg="",
        started_at=b.rented_at,
        dlperf=b.model.dlperf,
        storage_dph=b.storage_price,
    )
