"""Whether a running instance's worker can serve: its ``/healthz``, probed on the port Vast mapped.

The channel, and why (docs/provisioning.md, "Capacity that serves"): Vast's ``actual_status`` says the
container runs, not that the worker booted, and ``status_msg`` is Vast's, not the worker's. A push from
the worker would need an endpoint the operator runs. The worker already answers ``/healthz`` (200 once
booted with the queue answering, else 503) on ``METRICS_PORT``; the fleet exposes that port at rent
(``-p PORT:PORT``) and asks each running instance once a tick. The cost: the autoscaler must reach the
hosts' public ports, and the port is open to anyone (it reveals no secret). Without a health port
(``worker.health_port = 0``) readiness is not probed and a running container counts as serving.

``probe`` does the I/O; ``phase`` is pure, for the policy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import requests

from provisioning.models import Instance, Phase

log = logging.getLogger(__name__)


def probe(instances: Iterable[Instance], *, port: int, timeout_s: float = 3.0) -> dict[int, bool]:
    """instance id -> every worker on it answered 200 on /healthz; only running instances with a mapped
    port. With several GPUs the worker on GPU k listens on ``port + k`` (docker/entrypoint.sh): each
    mapped one is asked, and the instance is ready only when all answer. The entrypoint ends the
    container when a worker cannot serve (exit 3) or crash-loops, but a worker that is up and never
    ready (one GPU that hangs its boot) would otherwise leave the sizing counting a GPU that serves
    nothing. Ports not mapped (an instance rented with fewer mappings than GPUs) cannot be asked."""
    ready: dict[int, bool] = {}
    for inst in instances:
        slots = [port + k for k in range(max(1, inst.num_gpus))]
        mapped = [inst.ports[f"{p}/tcp"] for p in slots if f"{p}/tcp" in inst.ports]
        if (inst.actual_status or "") != "running" or not inst.public_ip or not mapped:
            continue
        ready[inst.id] = all(_answers(inst, host_port, timeout_s) for host_port in mapped)
    return ready


def _answers(inst: Instance, host_port: int, timeout_s: float) -> bool:
    try:
        reply = requests.get(f"http://{inst.public_ip}:{host_port}/healthz", timeout=timeout_s)
    except requests.RequestException as exc:
        log.debug("instance %s port %s: /healthz unreachable (%s)", inst.id, host_port, type(exc).__name__)
        return False
    return reply.status_code == 200


def phase(
    instance: Instance,
    *,
    now: float,
    started_at: float,
    last_ready: Mapping[int, float],
    boot_deadline_s: float,
    unready_after_s: float,
) -> Phase:
    """The phase of a running instance under probing: booting until its worker first answers (up to the
    boot deadline), running while it answers, unready once it has not answered for ``unready_after_s``."""
    seen = last_ready.get(instance.id)
    if seen is None or seen < started_at:
        return Phase.BOOTING if now - started_at <= boot_deadline_s else Phase.UNREADY
    return Phase.RUNNING if now - seen <= unready_after_s else Phase.UNREADY
