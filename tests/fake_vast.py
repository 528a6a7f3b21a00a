"""A fake Vast.ai API: a real HTTP server on loopback with the endpoints the provisioning client uses.

- ``POST /api/v0/bundles/``: offer search with ``{"field": {"op": value}}`` filters, order and limit;
- ``PUT /api/v0/asks/{offer_id}/``: rent (``env`` must be a JSON object);
- ``GET /api/v1/instances/``: the instance list, paged with ``next_token``/``after_token``;
- ``DELETE /api/v0/instances/{id}/``;
- ``PUT /api/v0/instances/{id}/`` with ``{"state": "stopped" | "running"}`` (stop keeps the disk and bills
  ``storage_total_cost`` only; a resume waits in "scheduling" while the GPU is someone else's).

Faults on demand: 429s without Retry-After, a create that errors but rents, a create slower than the
client's timeout (that rents anyway), an offer sold twice (the second rent never boots), instances stuck
loading, exited, offline, or stopped by an outbid, a destroy or state change answered 200 with
``success: false``, a key refused with 401 or 403 and a ``msg``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

IMAGE = "ghcr.io/acme/klein-worker:1.0"
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
    "gt": lambda a, b: a is not None and a > b,
    "gte": lambda a, b: a is not None and a >= b,
    "lt": lambda a, b: a is not None and a < b,
    "lte": lambda a, b: a is not None and a <= b,
    "in": lambda a, b: a in b,
    "notin": lambda a, b: a not in b,
}
_NOT_FILTERS = {"order", "type", "limit", "allocated_storage"}


class FakeVast:
    def __init__(
        self, *, api_key: str = "test-key", page_size: int = 2, clock: Callable[[], float] = time.time
    ):
        self.api_key = api_key
        self.page_size = page_size
        self.clock = clock
        self.lock = threading.Lock()
        self.offers: dict[int, dict[str, Any]] = {}
        self.instances: dict[int, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.auth_headers: list[str | None] = []  # the Authorization header of each request, as sent
        self.rent_bodies: list[dict[str, Any]] = []
        self._ids = 1000
        self._rate_limited = 0
        self._error_but_rent: set[int] = set()
        self._slow: dict[int, tuple[float, bool]] = {}
        self._oversold: set[int] = set()
        self._sold: set[int] = set()
        self._refused: dict[int, str] = {}  # instance id -> msg of a 200 + success:false reply
        self.gpu_taken: set[int] = set()  # stopped instances whose GPU someone else rented meanwhile
        self.forbidden_keys: dict[str, str] = {}  # key -> msg of a 403 (a key without the permission)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeVast:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- scenario -------------------------------------------------------------------------------------
    def add_offer(self, **fields: Any) -> int:
        with self.lock:
            self._ids += 1
            new_id = self._ids
            row: dict[str, Any] = {
                "id": new_id,
                "machine_id": 50_000 + self._ids,
                "host_id": 70_000 + self._ids,
                "gpu_name": "RTX 4090",
                "num_gpus": 1,
                "gpu_ram": 24564,
                "dph_total": 0.40,
                "min_bid": 0.20,
                "dlperf": 80.0,
                "reliability": 0.995,  # the server has both fields; the fleet filters on "reliability"
                "reliability2": 0.995,
                "verified": True,
                "cuda_max_good": 13.0,
                "disk_space": 200.0,
                "inet_down": 900.0,
                "rentable": True,
                "rented": False,
                "external": False,
                "geolocation": "Sweden, SE",
            }
            row.update(fields)
            row.setdefault("dlperf_per_dphtotal", (row["dlperf"] or 0.0) / max(row["dph_total"], 1e-9))
            self.offers[new_id] = row
            return new_id

    def add_instance(self, **fields: Any) -> int:
        with self.lock:
            self._ids += 1
            new_id = self._ids
            row = self._instance_row(new_id, {}, None)
            row.update(fields)
            self.instances[new_id] = row
            return new_id

    def rate_limit(self, count: int) -> None:
        with self.lock:
            self._rate_limited = count

    def error_but_rent(self, offer_id: int) -> None:
        self._error_but_rent.add(offer_id)

    def slow_create(self, offer_id: int, seconds: float, *, listed_late: bool = False) -> None:
        """Reply after ``seconds``; with ``listed_late`` the instance only appears in the list by then."""
        self._slow[offer_id] = (seconds, listed_late)

    def oversell(self, offer_id: int) -> None:
        self._oversold.add(offer_id)

    def set_status(self, instance_id: int, status: str | None, msg: str = "") -> None:
        with self.lock:
            row = self.instances[instance_id]
            row["actual_status"], row["status_msg"] = status, msg

    def boot_all(self) -> None:
        with self.lock:
            for row in self.instances.values():
                if row["actual_status"] in (None, "loading") and not row.get("_stuck"):
                    row["actual_status"] = "running"

    def outbid(self, instance_id: int) -> None:
        with self.lock:
            row = self.instances[instance_id]
            row.update(
                actual_status="stopped", cur_state="stopped", status_msg="stopped: outbid", is_bid=True
            )

    def refuse(self, instance_id: int, msg: str = "Instance is locked by an ongoing operation") -> None:
        """Answer DELETE/PUT on this instance with HTTP 200 and ``{"success": false}``."""
        self._refused[instance_id] = msg

    def route(self, command: str, path: str, body: Any, query: str) -> tuple[int, dict[str, Any]]:
        parts = [p for p in path.split("/") if p]
        if command == "POST" and parts == ["api", "v0", "bundles"]:
            return self.search(body or {})
        if command == "PUT" and parts[:3] == ["api", "v0", "asks"] and len(parts) == 4:
            return self.rent(int(parts[3]), body)
        if command == "GET" and parts == ["api", "v1", "instances"]:
            return self.list_page(parse_qs(query))
        if command == "DELETE" and parts[:3] == ["api", "v0", "instances"] and len(parts) == 4:
            return self.destroy(int(parts[3]))
        if command == "PUT" and parts[:3] == ["api", "v0", "instances"] and len(parts) == 4:
            return self.set_state(int(parts[3]), body)
        return 404, {"success": False, "error": "not_found"}

    def check_key(self, auth: str) -> tuple[int, dict[str, Any]] | None:
        """None for the right key; else the 403 (a key without the permission) or 401 reply."""
        key = auth.removeprefix("Bearer ")
        if key in self.forbidden_keys:
            return 403, {"success": False, "error": "forbidden", "msg": self.forbidden_keys[key]}
        if auth != f"Bearer {self.api_key}":
            return 401, {"success": False, "error": "auth_error", "msg": "Invalid user key"}
        return None

    def mutations(self) -> list[tuple[str, str, Any]]:
        return [r for r in self.requests if r[0] in ("PUT", "DELETE")]

    # -- endpoints ------------------------------------------------------------------------------------
    def _instance_row(
        self, new_id: int, body: dict[str, Any], offer: dict[str, Any] | None
    ) -> dict[str, Any]:
        offer = offer or {}
        return {
            "id": new_id,
            "label": body.get("label"),
            "image_uuid": body.get("image", IMAGE),
            "machine_id": offer.get("machine_id", 90_000 + new_id),
            "host_id": offer.get("host_id", 95_000 + new_id),
            "gpu_name": offer.get("gpu_name", "RTX 4090"),
            "num_gpus": offer.get("num_gpus", 1),
            "dph_total": body.get("price") or offer.get("dph_total", 0.40),
            "dlperf": offer.get("dlperf", 80.0),
            "actual_status": "loading",
            "intended_status": "running",
            "cur_state": "running",
            "status_msg": "pulling image",
            "start_date": self.clock(),
            "disk_space": body.get("disk", 40.0),
            "storage_total_cost": 0.01,  # $/h for the disk: what a stopped instance still bills
            "is_bid": body.get("price") is not None,
            "extra_env": [[k, v] for k, v in (body.get("env") or {}).items()],
        }

    def search(self, query: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            rows = [r for r in self.offers.values() if _matches(r, query)]
        if query.get("type") == "bid":
            rows = [r for r in rows if r.get("min_bid")]
        for field_name, direction in reversed(query.get("order") or []):
            rows.sort(key=_sort_key(field_name), reverse=direction == "desc")
        return 200, {"offers": rows[: int(query.get("limit") or 64)]}

    def rent(self, offer_id: int, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict) or not isinstance(body.get("env"), dict):
            return 400, {"success": False, "error": "invalid_args", "msg": "env must be a JSON object"}
        with self.lock:
            offer = self.offers.get(offer_id)
            if offer is None:
                return 400, {
                    "success": False,
                    "error": "no_such_ask",
                    "msg": "Instance type no longer available",
                }
            self.rent_bodies.append(body)
            self._ids += 1
            row = self._instance_row(self._ids, body, offer)
            if offer_id in self._sold:
                # Sold twice: Vast accepted the rent, but the GPU is someone else's; it never boots.
                row.update(_stuck=True, status_msg="Error: machine already in use")
            delay, listed_late = self._slow.get(offer_id, (0.0, False))
            if not listed_late:
                self.instances[row["id"]] = row
            if offer_id in self._oversold and offer_id not in self._sold:
                self._sold.add(offer_id)  # stays listed, rentable once more
            else:
                del self.offers[offer_id]
            new_id = row["id"]
        if delay:
            time.sleep(delay)
        if listed_late:
            with self.lock:
                row["start_date"] = self.clock()
                self.instances[new_id] = row
        if offer_id in self._error_but_rent:
            return 500, {
                "success": False,
                "error": "server_error",
                "msg": "internal error",
                "new_contract": new_id,
            }
        return 200, {"success": True, "new_contract": new_id}

    def list_page(self, params: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        filters = json.loads(params.get("select_filters", ["{}"])[0])
        limit = min(int(params.get("limit", ["25"])[0]), self.page_size)
        start = int(params.get("after_token", ["0"])[0])
        with self.lock:
            rows = [
                {k: v for k, v in r.items() if not k.startswith("_")}
                for r in sorted(self.instances.values(), key=lambda r: r["id"])
                if _matches(r, filters)
            ]
        page = rows[start : start + limit]
        token = str(start + limit) if start + limit < len(rows) else None
        return 200, {"instances": page, "next_token": token, "total_instances": len(rows)}

    def set_state(self, instance_id: int, body: Any) -> tuple[int, dict[str, Any]]:
        state = body.get("state") if isinstance(body, dict) else None
        with self.lock:
            row = self.instances.get(instance_id)
            if row is None:
                return 404, {"success": False, "error": "no_such_instance"}
            if instance_id in self._refused:
                return 200, {"success": False, "msg": self._refused[instance_id]}
            if state == "stopped":
                row.update(
                    actual_status="stopped", intended_status="stopped", cur_state="stopped", status_msg=""
                )
            elif state == "running":
                waiting = instance_id in self.gpu_taken
                row.update(
                    actual_status="scheduling" if waiting else "loading",
                    intended_status="running",
                    cur_state="running",
                    status_msg="waiting for the GPU to be free" if waiting else "starting",
                    _stuck=waiting,
                )
            else:
                return 400, {"success": False, "error": "invalid_args", "msg": f"bad state {state!r}"}
        return 200, {"success": True}

    def destroy(self, instance_id: int) -> tuple[int, dict[str, Any]]:
        with self.lock:
            if instance_id in self._refused and instance_id in self.instances:
                return 200, {"success": False, "msg": self._refused[instance_id]}
            if self.instances.pop(instance_id, None) is None:
                return 404, {"success": False, "error": "no_such_instance"}
        return 200, {"success": True, "msg": "Instance destroyed successfully"}


def _sort_key(field_name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: row.get(field_name) or 0


def _matches(row: dict[str, Any], query: dict[str, Any]) -> bool:
    for name, condition in query.items():
        if name in _NOT_FILTERS or not isinstance(condition, dict):
            continue
        value = row.get(name)  # field names as the server has them: no client-side aliases
        for op, expected in condition.items():
            if not _OPS[op](value, expected):
                return False
    return True


def _handler(fake: FakeVast) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (a create that "timed out"): the rent stands anyway

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null") if length else None
            url = urlparse(self.path)
            with fake.lock:
                fake.requests.append((self.command, url.path, body))
                fake.auth_headers.append(self.headers.get("Authorization"))
                limited = fake._rate_limited > 0
                fake._rate_limited -= 1 if limited else 0
            refused = fake.check_key(self.headers.get("Authorization") or "")
            if refused:
                return self._reply(*refused)
            if limited:
                return self._reply(429, {"success": False, "error": "rate_limited"})  # no Retry-After
            return self._reply(*fake.route(self.command, url.path, body, url.query))

        do_GET = do_POST = do_PUT = do_DELETE = _handle

    return Handler
