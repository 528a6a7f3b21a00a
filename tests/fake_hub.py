"""A loopback stand-in for the two Hugging Face hub calls a ``{"repo": ...}`` adapter makes:
the file listing (``paths-info``, for the size) and the file itself (``resolve``)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, files: dict[str, dict[str, bytes]]) -> None:
        """``files``: repo id -> {file name: content}."""
        self.files = files
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _repo(self, parts: list[str]) -> dict[str, bytes] | None:
                return hub.files.get("/".join(parts[:2]))

            def do_POST(self) -> None:  # /api/models/<owner>/<name>/paths-info/<rev>
                hub.requests.append(("POST", self.path))
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
                wanted = set(form.get("paths", []))
                parts = self.path.split("?")[0].strip("/").split("/")
                repo = self._repo(parts[2:4])
                if repo is None:
                    self._reply(
                        404, b"{}", {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"}
                    )
                    return
                listing = [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in repo.items()
                    if name in wanted  # like the hub: only the paths asked for, missing ones left out
                ]
                self._reply(200, json.dumps(listing).encode(), {"Content-Type": "application/json"})

            def do_HEAD(self) -> None:  # /<owner>/<name>/resolve/<rev>/<file>
                hub.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                repo = self._repo(parts)
                data = None if repo is None else repo.get("/".join(parts[4:]))
                if data is None:
                    self._reply(404, b"", {"X-Error-Code": "EntryNotFound"})
                    return
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                self._reply(200, data, {**headers, "Content-Type": "application/octet-stream"})

            do_GET = do_HEAD

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
