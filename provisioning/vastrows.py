"""Vast API rows (offer search, instance list) parsed into the fleet's plain data, tolerant of missing or
mistyped fields: a row that cannot be an offer or an instance is skipped, not an error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from provisioning.models import Instance, Offer


def parse_offer(row: Mapping[str, Any]) -> Offer | None:
    offer_id, machine = as_int(row.get("id")), as_int(row.get("machine_id"))
    if offer_id is None or machine is None:
        return None
    verification = row.get("verification")
    return Offer(
        id=offer_id,
        machine_id=machine,
        host_id=as_int(row.get("host_id")) or 0,
        gpu_name=str(row.get("gpu_name") or "unknown"),
        num_gpus=as_int(row.get("num_gpus")) or 1,
        gpu_ram_mb=as_int(row.get("gpu_ram")) or 0,
        dph_total=as_float(row.get("dph_total")) or 0.0,
        min_bid=as_float(row.get("min_bid")),
        dlperf=as_float(row.get("dlperf")),
        # The field the query filters on (OfferRequirements.to_query), not its sibling "reliability2".
        reliability=as_float(row.get("reliability")) or 0.0,
        verified=bool(row.get("verified")) or verification == "verified",
        cuda_max_good=as_float(row.get("cuda_max_good")) or 0.0,
        disk_space_gb=as_float(row.get("disk_space")) or 0.0,
        inet_down_mbps=as_float(row.get("inet_down")) or 0.0,
        geolocation=str(row.get("geolocation") or ""),
    )


def parse_instance(row: Mapping[str, Any]) -> Instance | None:
    instance_id = as_int(row.get("id"))
    if instance_id is None:
        return None
    return Instance(
        id=instance_id,
        label=row.get("label"),
        image=row.get("image_uuid") or row.get("image"),
        machine_id=as_int(row.get("machine_id")),
        host_id=as_int(row.get("host_id")),
        gpu_name=str(row.get("gpu_name") or "unknown"),
        num_gpus=as_int(row.get("num_gpus")) or 1,
        dph_total=as_float(row.get("dph_total")) or 0.0,
        actual_status=row.get("actual_status"),
        intended_status=row.get("intended_status"),
        status_msg=str(row.get("status_msg") or ""),
        started_at=as_float(row.get("start_date")),  # None: not scheduled yet (the caller dates it)
        is_bid=bool(row.get("is_bid")),
        dlperf=as_float(row.get("dlperf")),
        storage_dph=as_float(row.get("storage_total_cost")) or 0.0,
        public_ip=str(row.get("public_ipaddr") or "").strip() or None,
        ports=_host_ports(row.get("ports")),
    )


def _host_ports(ports: Any) -> dict[str, int]:
    """``{"9090/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41234"}]}`` -> ``{"9090/tcp": 41234}``."""
    out: dict[str, int] = {}
    for name, bindings in (ports or {}).items() if isinstance(ports, dict) else ():
        for binding in bindings or []:
            port = as_int(binding.get("HostPort")) if isinstance(binding, dict) else None
            if port is not None:
                out[str(name)] = port
                break
    return out


def as_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def as_float(value: Any) -> float | None:
    try:
        return float(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None
