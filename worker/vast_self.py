"""On Vast.ai, an idle worker may destroy its own instance so an idle GPU stops billing.

Vast injects ``CONTAINER_ID`` and a per-instance ``CONTAINER_API_KEY`` into every container;
that key is allowed to manage the instance it belongs to.
"""

from __future__ import annotations

import logging

import requests

log = logging.getLogger(__name__)


def destroy_own_instance(*, api_url: str, container_id: str, api_key: str, timeout: float = 15.0) -> bool:
    """True only when Vast says it destroyed the instance: a 200 with ``"success": false`` is a refusal."""
    if not api_key:
        log.error("cannot destroy own instance %s: no CONTAINER_API_KEY", container_id)
        return False
    url = f"{api_url.rstrip('/')}/api/v0/instances/{container_id}/"
    try:
        reply = requests.delete(url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)
    except requests.RequestException as exc:
        log.error("could not destroy own instance %s: %s", container_id, type(exc).__name__)
        return False
    try:
        data = reply.json()
    except ValueError:
        data = {}
    refused = isinstance(data, dict) and data.get("success") is False
    if reply.status_code >= 400 or refused:
        msg = str(data.get("msg") or data.get("error") or "") if isinstance(data, dict) else ""
        log.error("destroying own instance %s refused: HTTP %d %s", container_id, reply.status_code, msg)
        return False
    log.info("idle: destroyed own Vast instance %s", container_id)
    return True
