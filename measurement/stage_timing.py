"""Per-stage times of one klein pipeline call, for scripts/bench_gpu.py (the runtime never uses it).

The pipeline's three models are wrapped on the instance (their ``forward``, or ``decode`` for the
VAE), never inside a compiled region: the transformer and VAE compile their blocks/decoder, so a
wrapper around the outer call stays eager. On CUDA each call is bracketed by CUDA events, read after
one synchronisation at the end, so the timing adds no sync inside the call; on a CPU it is wall
time. "post" is the rest of the call: latent unpacking, the image processor, PIL conversion.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

STAGES = ("text_encoder", "denoise", "vae_decode")


class StageTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._marks: dict[str, list[tuple[Any, Any]]] = {stage: [] for stage in STAGES}

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _wrap(self, stage: str, call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self._mark()
            try:
                return call(*args, **kwargs)
            finally:
                self._marks[stage].append((start, self._mark()))

        return timed

    @contextmanager
    def attached(self, pipeline: Any) -> Iterator[StageTimer]:
        """Time ``pipeline``'s text encoder, transformer and VAE decode while inside the block."""
        targets = [
            (pipeline.text_encoder, "forward", "text_encoder"),
            (pipeline.transformer, "forward", "denoise"),
            (pipeline.vae, "decode", "vae_decode"),
        ]
        for module, method, stage in targets:
            setattr(module, method, self._wrap(stage, getattr(module, method)))
        try:
            yield self
        finally:
            for module, method, _ in targets:
                delattr(module, method)  # the class's own method shows through again

    def reset(self) -> None:
        for marks in self._marks.values():
            marks.clear()

    def seconds(self) -> dict[str, float]:
        """Seconds per stage since the last reset (summed over calls: 4 steps = 4 transformer calls)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return {
                stage: sum(start.elapsed_time(end) for start, end in marks) / 1000
                for stage, marks in self._marks.items()
            }
        return {stage: sum(end - start for start, end in marks) for stage, marks in self._marks.items()}


def time_stages(
    pipeline: Any, device: torch.device, call: Callable[[], Any], *, runs: int
) -> dict[str, float]:
    """Median per-stage seconds of ``call()`` over ``runs`` calls (already warmed), with ``post``
    the call's wall time not spent in the three models."""
    timer = StageTimer(device)
    rows: list[dict[str, float]] = []
    with timer.attached(pipeline):
        for _ in range(runs):
            timer.reset()
            if timer.cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            call()
            stages = timer.seconds()  # synchronises on CUDA
            total = time.perf_counter() - started
            rows.append({**stages, "post": max(0.0, total - sum(stages.values())), "total": total})
    return {key: sorted(row[key] for row in rows)[len(rows) // 2] for key in rows[0]}
