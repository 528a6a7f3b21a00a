"""What the autoscaler remembers between ticks and runs: queue history, machines to avoid, pending rents.

Kept in a small JSON file so that ``autoscale --once`` from cron sees the same history as the loop does
(a scale-in needs a sustained surplus, which one sample cannot show).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from provisioning.models import PendingRent, QueueSample

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class FleetMemory:
    samples: list[QueueSample] = field(default_factory=list)
    avoid: dict[int, float] = field(default_factory=dict)  # machine id -> avoid until (epoch s)
    pending: list[PendingRent] = field(default_factory=list)
    # instance id -> when it was first listed without a start_date (its boot deadline counts from then)
    first_seen: dict[int, float] = field(default_factory=dict)
    resumed: dict[int, float] = field(default_factory=dict)  # instance id -> resume asked at
    cold_since: dict[int, float] = field(default_factory=dict)  # instance id -> stopped into the pool at
    last_ready: dict[int, float] = field(default_factory=dict)  # instance id -> last /healthz 200 at
    # image -> the status_msg that showed it cannot be pulled: rents of it are held until cleared
    image_hold: dict[str, str] = field(default_factory=dict)

    def remember(self, sample: QueueSample, *, keep_s: float) -> None:
        """Add a sample and forget those older than ``keep_s`` (keeping one just before, for the window)."""
        self.samples.append(sample)
        cutoff = sample.at - keep_s
        older = [k for k, s in enumerate(self.samples) if s.at < cutoff]
        if older:
            del self.samples[: older[-1]]


class StateFile:
    def __init__(self, *, path: Path) -> None:
        self.path = path

    def load(self) -> FleetMemory:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return FleetMemory(
                samples=[QueueSample.from_dict(s) for s in data.get("samples", [])],
                avoid={int(k): float(v) for k, v in data.get("avoid", {}).items()},
                pending=[PendingRent(**p) for p in data.get("pending", [])],
                first_seen=_times(data.get("first_seen")),
                resumed=_times(data.get("resumed")),
                cold_since=_times(data.get("cold_since")),
                last_ready=_times(data.get("last_ready")),
                image_hold={str(k): str(v) for k, v in (data.get("image_hold") or {}).items()},
            )
        except FileNotFoundError:
            return FleetMemory()
        except (OSError, ValueError, TypeError) as exc:
            # A damaged file costs only history (a slower scale-in), never a wrong rent: start afresh.
            log.warning("ignoring unreadable state file %s: %s", self.path, exc)
            return FleetMemory()

    def save(self, memory: FleetMemory) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "samples": [asdict(s) for s in memory.samples],
            "avoid": {str(k): v for k, v in memory.avoid.items()},
            "pending": [asdict(p) for p in memory.pending],
            "first_seen": {str(k): v for k, v in memory.first_seen.items()},
            "resumed": {str(k): v for k, v in memory.resumed.items()},
            "cold_since": {str(k): v for k, v in memory.cold_since.items()},
            "last_ready": {str(k): v for k, v in memory.last_ready.items()},
            "image_hold": dict(memory.image_hold),
        }
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        os.replace(tmp, self.path)  # atomic: a crash mid-write leaves the old file


def _times(data: object) -> dict[int, float]:
    return {int(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}
