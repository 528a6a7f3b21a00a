"""A loopback HTTP server whose paths script their own behaviour, for transfer failure tests.

Paths (any suffix after the script is free, e.g. a file name):
  /img/<name>.png              200 with a PNG (GET) from ``images``
  /flaky/<n>/<name>            500 for the first n requests, then the image
  /slow/<seconds>/<name>       sleeps, then the image (a job that is "mid-flight")
  /status/<code>/<name>        always that status (PUT or GET)
  /trickle/<seconds>/<name>    the image a few bytes at a time, spread over that many seconds
  /together/<n>/<name>         held until n requests on /together/<n>/ are in hand at once, then
                               ``together_hold`` seconds more, then the image (jobs that certainly
                               overlap); 409 if the others do not come within TOGETHER_TIMEOUT_S
  /hook                        records POSTed bodies and headers (webhooks)
Every request is recorded in ``requests`` as (method, path, headers, body).
"""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

TOGETHER_TIMEOUT_S = 20.0  # below the worker's 30 s read timeout: a lone request fails, never hangs


def png_bytes(width: int = 64, height: int = 64, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


class ScriptedServer:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.bodies: dict[str, bytes] = {}  # path -> explicit GET body
        self.content_types: dict[str, str] = {}
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self.hit = threading.Event()  # set on every request (tests wait on it)
        self.delay_override: float | None = None  # makes /slow/ paths answer at once when set
        self.together_hold = 0.0  # seconds /together/ requests stay held after all n have arrived
        self._meetings: dict[int, threading.Barrier] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _record(self) -> int:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with server._lock:
                    server.requests.append((self.command, self.path, dict(self.headers), body))
                    key = self.path.split("?")[0]
                    server._counts[key] = server._counts.get(key, 0) + 1
                    count = server._counts[key]
                server.hit.set()
                return count

            def _send(self, code: int, body: bytes = b"", content_type: str = "image/png") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _serve(self) -> None:
                count = self._record()
                path = self.path.split("?")[0]
                parts = path.strip("/").split("/")
                if parts[0] == "status":
                    return self._send(int(parts[1]), b"scripted failure", "text/plain")
                if parts[0] == "flaky" and count <= int(parts[1]):
                    return self._send(500, b"try again", "text/plain")
                if parts[0] == "trickle":
                    return self._trickle(png_bytes(), float(parts[1]))
                if not server._hold(parts):
                    return self._send(409, b"the other requests never came", "text/plain")
                if self.command in ("PUT", "POST", "DELETE"):
                    return self._send(200, b"")
                body = server.bodies.get(path, png_bytes())
                self._send(200, body, server.content_types.get(path, "image/png"))

            def _trickle(self, body: bytes, seconds: float) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                pieces = [body[i : i + 16] for i in range(0, len(body), 16)]
                for piece in pieces:
                    self.wfile.write(piece)
                    self.wfile.flush()
                    time.sleep(seconds / len(pieces))

            do_GET = do_PUT = do_POST = do_DELETE = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _hold(self, parts: list[str]) -> bool:
        """/slow/ and /together/ paths wait here before answering; False when a /together/
        request's companions did not all come in time."""
        if parts[0] == "slow":
            time.sleep(float(parts[1]) if self.delay_override is None else self.delay_override)
        return parts[0] != "together" or self._meet(int(parts[1]))

    def _meet(self, parties: int) -> bool:
        """Block until ``parties`` requests wait here at once (then hold them a while longer);
        False when they did not all come in time."""
        with self._lock:
            barrier = self._meetings.setdefault(parties, threading.Barrier(parties))
        try:
            barrier.wait(timeout=TOGETHER_TIMEOUT_S)
        except threading.BrokenBarrierError:
            return False
        time.sleep(self.together_hold)
        return True

    def count(self, path: str) -> int:
        with self._lock:
            return self._counts.get(path, 0)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
