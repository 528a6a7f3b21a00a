"""Job arrival traces for the simulator: a CSV of timestamps, or a built-in step/burst/sine pattern."""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

HOUR = 3600.0


def _step(t: float, duration: float) -> float:
    # Quiet, then a sustained 10x rise for half the run, then quiet again.
    return 2.0 if duration * 0.25 <= t < duration * 0.75 else 0.2


def _burst(t: float, duration: float) -> float:
    # A light background with a 2-minute burst of ~1500 jobs at 10 minutes past every 90 minutes.
    return 12.5 if 0.0 <= (t % (1.5 * HOUR)) - 600.0 < 120.0 else 0.2


def _sine(t: float, duration: float) -> float:
    # A daily-like swing compressed to a 2-hour period: 0.1 to 1.9 jobs/s around a mean of 1.
    return 1.0 + 0.9 * math.sin(2.0 * math.pi * t / (2.0 * HOUR))


PATTERNS: dict[str, Callable[[float, float], float]] = {"step": _step, "burst": _burst, "sine": _sine}


def generate(pattern: str, *, duration_s: float = 4 * HOUR, seed: int = 0, scale: float = 1.0) -> list[float]:
    """Poisson arrivals (seconds from 0) following ``pattern``'s rate, by thinning; seeded, so repeatable."""
    rate = PATTERNS[pattern]
    peak = max(rate(t, duration_s) for t in range(0, int(duration_s) + 1)) * scale
    rng = random.Random(seed)
    arrivals: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return arrivals
        if rng.random() * peak < rate(t, duration_s) * scale:
            arrivals.append(t)


def read_csv(path: Path) -> list[float]:
    """Timestamps from the first column: seconds (relative or epoch) or ISO 8601; a header row is fine.

    Returned sorted and shifted so that the first arrival is at 0.
    """
    stamps: list[float] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            cell = row[0].strip() if row else ""
            if not cell or cell.startswith("#"):
                continue
            value = _parse_stamp(cell)
            if value is None:
                if not stamps and line_no == 1:
                    continue  # a header
                raise ValueError(f"{path}:{line_no}: {cell!r} is neither seconds nor an ISO 8601 time")
            stamps.append(value)
    if not stamps:
        raise ValueError(f"{path}: no timestamps")
    stamps.sort()
    return [s - stamps[0] for s in stamps]


def _parse_stamp(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(cell.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def load_trace(spec: str, *, duration_s: float = 4 * HOUR, seed: int = 0, scale: float = 1.0) -> list[float]:
    """``step``, ``burst``, ``sine``, or the path of a CSV file."""
    if spec in PATTERNS:
        return generate(spec, duration_s=duration_s, seed=seed, scale=scale)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"trace {spec!r} is neither a file nor one of {', '.join(PATTERNS)}")
    return read_csv(path)
