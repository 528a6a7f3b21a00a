"""A small typed client for the Vast.ai REST API (``requests``), with the API's sharp edges handled.

- 429 replies come without Retry-After: back off exponentially (with jitter) and try again.
- A create that times out may still have rented: never retry it; report the outcome as unknown so the
  caller reconciles by listing instances by label.
- An error reply can still carry ``new_contract``: the rent happened, whatever the status says.
- A ``DELETE`` or ``PUT`` can answer 200 with ``{"success": false, "msg": ...}``: that is a failure (the
  official ``vastai`` client reads ``success`` on every mutating call, and so do we).
- 401/403 mean the key is wrong for good: raised as ``VastAuthError`` naming where the key came from, never
  retried, never answered by trying the next offer.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import requests

from provisioning.models import Instance, Offer
from provisioning.vastrows import as_int, parse_instance, parse_offer

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://console.vast.ai"
PAGE_SIZE = 25  # the v1 instance list serves at most 25 rows per page
_RETRY_STATUS = {429, 502, 503, 504}  # safe to repeat: the request was not acted on
_AUTH_STATUS = {401, 403}  # the key is wrong for good: never retried
_MAX_PAGES = 1000  # a server that keeps handing out next_token must not loop us forever


class VastError(RuntimeError):
    """A Vast API call failed for good (after retries where retrying is safe)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class VastAuthError(VastError):
    """401/403: the key is missing, wrong or lacks a permission. Nothing else will work this run."""


class CreateOutcome(StrEnum):
    RENTED = "rented"
    REJECTED = "rejected"  # definitely not rented (offer gone, bad request)
    UNKNOWN = "unknown"  # timed out or failed mid-way: may have rented; reconcile by listing


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchSpec:
    """What every fleet instance runs: the body of ``PUT /api/v0/asks/{offer_id}/`` minus the price."""

    image: str
    label: str
    env: Mapping[str, str] = field(repr=False)  # holds credentials: kept out of reprs and logs
    disk_gb: float = 40.0
    runtype: str = "args"  # run the image's own entrypoint (the worker), not an ssh shell
    onstart: str | None = None
    image_login: str | None = field(default=None, repr=False)  # "-u USER -p TOKEN ghcr.io" (private image)

    def priced(self, worker_usd_per_hour: float) -> LaunchSpec:
        """This spec with the worker's ``PRICE_PER_HOUR`` (for ``cost_usd`` in its results); a value the
        operator put in the worker's env wins."""
        if "PRICE_PER_HOUR" in self.env:
            return self
        return replace(self, env={**self.env, "PRICE_PER_HOUR": f"{worker_usd_per_hour:.6g}"})

    def body(self, price: float | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "client_id": "me",
            "image": self.image,
            "env": dict(self.env),
            "disk": self.disk_gb,
            "label": self.label,
            "runtype": self.runtype,
            # Fail instead of creating a stopped instance when the machine is already taken.
            "cancel_unavail": True,
        }
        if self.onstart:
            body["onstart"] = self.onstart
        if self.image_login:
            body["image_login"] = self.image_login
        if price is not None:
            body["price"] = price  # an interruptible bid, $/h
        return body


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateResult:
    outcome: CreateOutcome
    instance_id: int | None = None
    message: str = ""


class VastClient:
    def __init__(
        self,
        *,
        api_key: str,
        api_url: str = DEFAULT_API_URL,
        key_source: str = "VAST_API_KEY",
        session: requests.Session | None = None,
        timeout_s: float = 30.0,
        create_timeout_s: float = 60.0,
        max_attempts: int = 6,
        backoff_s: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._url = api_url.rstrip("/")
        self._session = session or requests.Session()
        self._session.headers["Accept"] = "application/json"
        if api_key:
            # An empty key sends no header at all: "Bearer " with nothing after it is a malformed request.
            self._session.headers["Authorization"] = f"Bearer {api_key}"
        self._key_source = key_source if api_key else "no key"
        self._timeout = timeout_s
        self._create_timeout = create_timeout_s
        self._attempts = max(1, max_attempts)
        self._backoff = backoff_s
        self._sleep = sleep

    def search_offers(self, query: Mapping[str, Any]) -> list[Offer]:
        reply = self._call("POST", "/api/v0/bundles/", json_body=dict(query))
        rows = reply.json().get("offers") or []
        return [o for o in (parse_offer(r) for r in rows if isinstance(r, dict)) if o is not None]

    def list_instances(self, *, label: str | None = None) -> list[Instance]:
        """Every instance (of ``label`` when given), following ``next_token`` across pages."""
        params: dict[str, Any] = {
            "select_filters": json.dumps({"label": {"in": [label]}} if label else {}),
            "order_by": json.dumps([{"col": "id", "dir": "asc"}]),
            "limit": PAGE_SIZE,
        }
        found: dict[int, Instance] = {}
        for _ in range(_MAX_PAGES):
            data = self._call("GET", "/api/v1/instances/", params=params).json()
            for row in data.get("instances") or []:
                inst = parse_instance(row) if isinstance(row, dict) else None
                # Filter again here: a server that ignores select_filters must not hand us other fleets.
                if inst is not None and (label is None or inst.label == label):
                    found[inst.id] = inst
            token = data.get("next_token")
            if not token:
                break
            params["after_token"] = token
        else:
            log.warning("instance list still paging after %d pages; using what was read", _MAX_PAGES)
        return sorted(found.values(), key=lambda i: i.id)

    def create_instance(self, offer_id: int, spec: LaunchSpec, *, price: float | None = None) -> CreateResult:
        try:
            reply = self._call(
                "PUT",
                f"/api/v0/asks/{offer_id}/",
                json_body=spec.body(price),
                timeout=self._create_timeout,
                repeat_on_failure=False,
                check=False,
            )
        except requests.RequestException as exc:
            # The request may have reached Vast and rented: retrying could rent twice.
            return CreateResult(outcome=CreateOutcome.UNKNOWN, message=type(exc).__name__)
        data = _json_or_empty(reply)
        contract = as_int(data.get("new_contract"))
        if contract is None and reply.status_code in _AUTH_STATUS:
            raise self._auth_error("PUT", f"/api/v0/asks/{offer_id}/", reply)
        message = str(data.get("msg") or data.get("error") or reply.reason or "")
        if contract is not None:
            if not reply.ok or data.get("success") is False:
                log.warning(
                    "offer %s: error reply (%s) still carries new_contract %s",
                    offer_id,
                    reply.status_code,
                    contract,
                )
            return CreateResult(outcome=CreateOutcome.RENTED, instance_id=contract, message=message)
        if reply.status_code >= 500:
            return CreateResult(outcome=CreateOutcome.UNKNOWN, message=f"HTTP {reply.status_code} {message}")
        return CreateResult(outcome=CreateOutcome.REJECTED, message=f"HTTP {reply.status_code} {message}")

    def destroy_instance(self, instance_id: int) -> bool:
        """Destroy (Vast stops the container with SIGTERM first). False if it was already gone."""
        reply = self._call("DELETE", f"/api/v0/instances/{instance_id}/", json_body={}, check=False)
        if reply.status_code == 404:
            return False
        _check_success(reply, f"destroy {instance_id}")
        return True

    def set_state(self, instance_id: int, state: str) -> None:
        """Stop (``"stopped"``: the GPU is released, the disk kept and billed) or resume (``"running"``).

        ``PUT /api/v0/instances/{id}/`` with ``{"state": ...}``, as ``vastai stop/start instance`` sends it.
        A resume only asks: the instance waits in "scheduling" until its GPU is free again.
        """
        if state not in ("stopped", "running"):
            raise ValueError(f"state must be 'stopped' or 'running', not {state!r}")
        path = f"/api/v0/instances/{instance_id}/"
        reply = self._call("PUT", path, json_body={"state": state}, check=False)
        _check_success(reply, f"set instance {instance_id} {state}")

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        timeout: float | None = None,
        repeat_on_failure: bool = True,
        check: bool = True,
    ) -> requests.Response:
        """Send, backing off on 429 (always safe: nothing was done) and, for idempotent calls, on
        gateway errors and connection failures."""
        delay = self._backoff
        for attempt in range(1, self._attempts + 1):
            last = attempt == self._attempts
            try:
                reply = self._session.request(
                    method, self._url + path, params=params, json=json_body, timeout=timeout or self._timeout
                )
            except requests.RequestException:
                if not repeat_on_failure or last:
                    raise
                log.info("%s %s failed, retrying in %.1fs", method, path, delay)
            else:
                retry = reply.status_code == 429 or (repeat_on_failure and reply.status_code in _RETRY_STATUS)
                if not retry or last:
                    if reply.status_code in _AUTH_STATUS:
                        raise self._auth_error(method, path, reply)
                    if check and not reply.ok:
                        raise VastError(
                            f"{method} {path}: HTTP {reply.status_code}", status=reply.status_code
                        )
                    return reply
                log.info("%s %s: HTTP %s, retrying in %.1fs", method, path, reply.status_code, delay)
            self._sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 60.0)
        raise AssertionError("unreachable")  # pragma: no cover

    def _auth_error(self, method: str, path: str, reply: requests.Response) -> VastAuthError:
        data = _json_or_empty(reply)
        msg = str(data.get("msg") or data.get("error") or reply.reason or "")
        text = f"{method} {path}: HTTP {reply.status_code} {msg}".rstrip()
        return VastAuthError(f"{text} (API key from {self._key_source})", status=reply.status_code)


def _check_success(reply: requests.Response, what: str) -> None:
    """Raise unless the reply is 2xx and does not say ``"success": false``."""
    data = _json_or_empty(reply)
    if reply.ok and data.get("success") is not False:
        return
    msg = str(data.get("msg") or data.get("error") or reply.reason or "")
    raise VastError(f"{what}: HTTP {reply.status_code} {msg}".rstrip(), status=reply.status_code)


def _json_or_empty(reply: requests.Response) -> dict[str, Any]:
    try:
        data = reply.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
