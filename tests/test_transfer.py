"""TransferClient against real servers: moto's S3 for presigned URLs, a scripted loopback HTTP server
for failures (flaky, 4xx, oversized, bombs, redirects), and the SSRF guard on literal addresses."""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import socket
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import boto3
import pytest
import requests
from botocore.config import Config
from moto.server import ThreadedMotoServer
from PIL import Image

from handlers.errors import DownloadFailed, InvalidInput, UploadFailed
from worker.transfer import TransferClient
from worker.urls import RedactQueryFilter, UrlGuard, redact_text, redact_url

BUCKET = "klein-out"
SECRET = "testing"
SIGNATURE = "X-Amz-Signature"


def png_bytes(size: tuple[int, int] = (8, 6), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color=0).save(buf, format="PNG")
    return buf.getvalue()


# -- a scripted loopback HTTP server ------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True
    delay: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class ScriptedServer:
    """Routes map a path to a function of the request; ``sequence`` replays replies in order."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[Seen], Reply]] = {}
        self.seen: list[Seen] = []
        self._stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Seen(self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
                outer.seen.append(request)
                route = outer.routes.get(urlsplit(self.path).path)
                reply = route(request) if route else Reply(404, b"no route")
                if reply.delay:
                    outer._stop.wait(reply.delay)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.content_length:
                    self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                try:
                    self.wfile.write(reply.body)
                except OSError:
                    pass  # the client gave up (timeout, size cap): expected in those tests

            do_GET = do_PUT = do_POST = _handle

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def sequence(self, path: str, *replies: Reply) -> None:
        remaining = list(replies)
        self.routes[path] = lambda _request: remaining.pop(0) if len(remaining) > 1 else remaining[0]

    def close(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    scripted = ScriptedServer()
    yield scripted
    scripted.close()


def client(**overrides: object) -> TransferClient:
    options: dict[str, object] = {"allow_private_urls": True, "attempts": 3, "backoff_seconds": 0.01}
    options.update(overrides)
    return TransferClient(**options)  # type: ignore[arg-type]


# -- moto S3 ------------------------------------------------------------------------------------


@dataclass
class S3:
    client: object
    endpoint: str

    def presign(self, operation: str, key: str, **params: str) -> str:
        return self.client.generate_presigned_url(  # type: ignore[attr-defined]
            operation, Params={"Bucket": BUCKET, "Key": key, **params}, ExpiresIn=300
        )


def s3_client(endpoint: str) -> object:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key=SECRET,
        # SigV4 query auth (X-Amz-Signature...) as real buckets use; path style for an IP endpoint.
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            env.setenv(name, "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        host, port = moto.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = s3_client(endpoint)
        s3.create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
        try:
            yield S3(client=s3, endpoint=endpoint)
        finally:
            moto.stop()


# -- redaction ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://b.s3.amazonaws.com/out/1.png?X-Amz-Algorithm=AWS4&X-Amz-Signature=abc123#frag",
            "https://b.s3.amazonaws.com/out/1.png",
        ),
        ("https://user:pass@example.com:8443/a/b.png?token=x", "https://example.com:8443/a/b.png"),
        ("http://[::1]:9000/k?Signature=s", "http://[::1]:9000/k"),
        ("https://example.com/plain.png", "https://example.com/plain.png"),
    ],
)
def test_redact_url_drops_query_fragment_and_userinfo(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_text_and_filter_hide_query_strings_from_third_party_logs(
    server: ScriptedServer, s3: S3, caplog: pytest.LogCaptureFixture
) -> None:
    assert (
        redact_text('"PUT /b/k.png?X-Amz-Signature=abc HTTP/1.1" 403')
        == '"PUT /b/k.png?<redacted> HTTP/1.1" 403'
    )
    assert redact_text("is it? yes") == "is it? yes"
    # urllib3 logs the request path and query at DEBUG; the filter keeps it out of handlers.
    caplog.handler.addFilter(RedactQueryFilter())
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")  # whatever level an earlier CLI left it at
    server.sequence("/out.png", Reply(403))
    url = server.url("/out.png") + "?" + urlsplit(s3.presign("put_object", "x.png")).query
    with pytest.raises(UploadFailed):
        client().upload(url, b"x", "image/png")
    assert "urllib3" in {record.name.split(".")[0] for record in caplog.records}
    assert SIGNATURE not in caplog.text


# -- the SSRF guard -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://localhost/x.png",
        "http://2130706433/x.png",  # 127.0.0.1 as one decimal number, resolved by getaddrinfo
        "http://10.0.0.1/x.png",
        "http://192.168.1.10/x.png",
        "http://100.64.0.1/x.png",  # carrier-grade NAT
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/x.png",
        "http://224.0.0.1/x.png",
        "http://[::1]/x.png",
        "http://[::]/x.png",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://[::ffff:169.254.169.254]/x.png",
        "http://[64:ff9b::a00:1]/x.png",  # NAT64 of 10.0.0.1
        "http://[2002:7f00:1::1]/x.png",  # 6to4 of 127.0.0.1
        "http://[fe80::1]/x.png",
        "http://[fd00::1]/x.png",
        "http://[ff02::1]/x.png",
    ],
)
def test_guard_refuses_non_public_addresses(url: str) -> None:
    signed = url + "?X-Amz-Signature=secret"
    with pytest.raises(InvalidInput) as caught:
        UrlGuard.build().check(signed, field="images[0].url")
    assert caught.value.message.startswith("images[0].url: ")
    assert "secret" not in caught.value.message


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x.png",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "//example.com/x",
    ],
)
def test_guard_refuses_other_schemes(url: str) -> None:
    # Even with private addresses allowed: the scheme rule is not an SSRF exception.
    with pytest.raises(InvalidInput, match=r"^upload_url: URL scheme .* not allowed"):
        UrlGuard.build(allow_private=True).check(url, field="upload_url")


@pytest.mark.parametrize(
    "url", ["http:///x.png", "https://:80/x.png", "http://[::1/x.png", "http://h:99999/"]
)
def test_guard_refuses_malformed_urls(url: str) -> None:
    with pytest.raises(InvalidInput, match=r"^image_url: "):
        UrlGuard.build(allow_private=True).check(url, field="image_url")


@pytest.mark.parametrize("url", ["http://8.8.8.8/x.png", "https://[2606:4700:4700::1111]:8443/x.png"])
def test_guard_accepts_public_literals(url: str) -> None:
    UrlGuard.build().check(url, field="images")


def test_unresolvable_host_fails_the_transfer_as_transient() -> None:
    with pytest.raises(DownloadFailed) as caught:
        TransferClient(attempts=2, backoff_seconds=0.0).download_image("https://no-such-host.invalid/x.png")
    assert caught.value.retryable is True
    assert "HostResolutionError" in caught.value.message


def test_private_url_refused_before_any_request(server: ScriptedServer) -> None:
    server.sequence("/x.png", Reply(200, png_bytes(), {"Content-Type": "image/png"}))
    guarded = TransferClient(attempts=1)
    with pytest.raises(InvalidInput, match="^images: "):
        guarded.download_image(server.url("/x.png"))
    with pytest.raises(InvalidInput, match="^upload_url: "):
        guarded.upload(server.url("/x.png"), b"data", "image/png")
    with pytest.raises(InvalidInput, match="^webhook_url: "):
        guarded.post_json(server.url("/x.png"), b"{}", {})
    assert server.seen == []
    client().download_image(server.url("/x.png"))  # the same URL with the guard opened
    assert len(server.seen) == 1


# -- downloads ----------------------------------------------------------------------------------


def test_download_retries_5xx_then_succeeds(server: ScriptedServer) -> None:
    server.sequence(
        "/img.png", Reply(500), Reply(502), Reply(200, png_bytes((8, 6)), {"Content-Type": "image/png"})
    )
    image = client().download_image(server.url("/img.png?X-Amz-Signature=abc"))
    assert image.size == (8, 6) and image.mode == "RGB"
    assert len(server.seen) == 3


def test_download_gives_up_after_attempts_as_retryable(server: ScriptedServer) -> None:
    server.sequence("/img.png", Reply(503))
    with pytest.raises(DownloadFailed) as caught:
        client().download_image(server.url("/img.png?X-Amz-Signature=abc"), field="image_url")
    assert caught.value.retryable is True
    assert caught.value.message.startswith("image_url: ") and "HTTP 503" in caught.value.message
    assert len(server.seen) == 3


def test_download_404_is_permanent_and_not_retried(server: ScriptedServer) -> None:
    with pytest.raises(DownloadFailed) as caught:
        client().download_image(server.url("/missing.png?X-Amz-Signature=abc"))
    assert caught.value.retryable is False
    assert caught.value.code == "download_failed"
    assert server.url("/missing.png") in caught.value.message
    assert "abc" not in caught.value.message
    assert len(server.seen) == 1


def test_connection_refused_is_retried_then_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.png?X-Amz-Signature=abc"
    with pytest.raises(DownloadFailed) as caught:
        client().download_image(url)
    assert caught.value.retryable is True
    # requests' own message carries the whole URL: it must not ride along as the cause.
    assert SIGNATURE not in "".join(traceback.format_exception(caught.value))


def test_read_timeout_is_retried(server: ScriptedServer) -> None:
    good = Reply(200, png_bytes(), {"Content-Type": "image/png"})
    server.sequence("/slow.png", Reply(200, png_bytes(), {"Content-Type": "image/png"}, delay=1.0), good)
    image = client(read_timeout=0.2).download_image(server.url("/slow.png"))
    assert image.size == (8, 6)
    assert len(server.seen) == 2


@pytest.mark.parametrize("content_length", [True, False])
def test_oversized_download_is_rejected(server: ScriptedServer, content_length: bool) -> None:
    body = png_bytes((64, 64), "RGB") + b"\0" * 5000
    server.sequence(
        "/big.png", Reply(200, body, {"Content-Type": "image/png"}, content_length=content_length)
    )
    with pytest.raises(InvalidInput, match=r"^images: .*larger than the 1000 byte download limit"):
        client(max_download_bytes=1000).download_image(server.url("/big.png"))
    assert len(server.seen) == 1


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """20000x20000 pixels (400 MP) of 1-bit zeros: ~50 KB of PNG, ~1.2 GB once decoded as RGB."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    return buf.getvalue()


def test_decompression_bomb_is_rejected(server: ScriptedServer, bomb: bytes) -> None:
    assert len(bomb) < 100_000
    server.sequence("/bomb.png", Reply(200, bomb, {"Content-Type": "image/png"}))
    with pytest.raises(InvalidInput, match=r"^images: .*(pixels|bomb)"):
        client().download_image(server.url("/bomb.png"))
    assert len(server.seen) == 1


def test_pixel_cap_is_configurable(server: ScriptedServer) -> None:
    server.sequence("/img.png", Reply(200, png_bytes((64, 64)), {"Content-Type": "image/png"}))
    with pytest.raises(InvalidInput, match=r"^image_url: image is 64x64"):
        client(max_pixels=1000).download_image(server.url("/img.png"), field="image_url")


@pytest.mark.parametrize(
    "reply",
    [
        Reply(200, b"<html>login</html>", {"Content-Type": "text/html; charset=utf-8"}),
        Reply(200, b"definitely not a png", {"Content-Type": "image/png"}),
        Reply(200, b"\x89PNG\r\n\x1a\n truncated", {"Content-Type": "application/octet-stream"}),
    ],
)
def test_non_image_body_is_invalid_input_and_not_retried(server: ScriptedServer, reply: Reply) -> None:
    server.sequence("/x", reply)
    with pytest.raises(InvalidInput, match=r"^images: "):
        client().download_image(server.url("/x"))
    assert len(server.seen) == 1


def test_redirects_are_followed_and_each_hop_checked(server: ScriptedServer) -> None:
    server.sequence("/a", Reply(302, headers={"Location": "/b?X-Amz-Signature=abc"}))
    server.sequence("/b", Reply(307, headers={"Location": server.url("/c.png")}))
    server.sequence("/c.png", Reply(200, png_bytes(), {"Content-Type": "image/png"}))
    # The guard is on, with only this loopback server let through.
    guarded = client(allow_private_urls=False, allowed_networks=["127.0.0.1/32"])
    assert guarded.download_image(server.url("/a")).size == (8, 6)
    assert [seen.path for seen in server.seen] == ["/a", "/b?X-Amz-Signature=abc", "/c.png"]


@pytest.mark.parametrize(
    "location",
    [
        "http://10.0.0.1/x.png",
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://[::1]/x.png",
        "http://[::ffff:192.168.0.1]/x.png",
        "ftp://example.com/x.png",
        "file:///etc/passwd",
    ],
)
def test_redirect_to_refused_url_is_invalid_input(server: ScriptedServer, location: str) -> None:
    server.sequence("/a", Reply(302, headers={"Location": location}))
    guarded = client(allow_private_urls=False, allowed_networks=["127.0.0.1/32"])
    with pytest.raises(InvalidInput, match=r"^images: "):
        guarded.download_image(server.url("/a"))
    assert len(server.seen) == 1


def test_redirect_loop_is_permanent_failure(server: ScriptedServer) -> None:
    server.sequence("/loop", Reply(302, headers={"Location": "/loop"}))
    with pytest.raises(DownloadFailed, match="redirected more than 5 times") as caught:
        client().download_image(server.url("/loop"))
    assert caught.value.retryable is False
    assert len(server.seen) == 6


# -- uploads and presigned S3 -------------------------------------------------------------------


def test_upload_roundtrip_through_moto_presigned_urls(s3: S3) -> None:
    data = png_bytes((16, 16))
    put_url = s3.presign("put_object", "jobs/scene-1.png", ContentType="image/png")
    assert SIGNATURE in put_url
    transfer = client()
    output_url = transfer.upload(put_url, data, "image/png")
    assert output_url == f"{s3.endpoint}/{BUCKET}/jobs/scene-1.png"
    stored = s3.client.get_object(Bucket=BUCKET, Key="jobs/scene-1.png")  # type: ignore[attr-defined]
    assert stored["ContentType"] == "image/png"
    assert stored["Body"].read() == data
    # And a presigned GET serves as an input image.
    assert transfer.download_image(s3.presign("get_object", "jobs/scene-1.png")).size == (16, 16)


def sigv4_query_signature_valid(request: Seen) -> bool:
    """Recompute an S3 SigV4 query-auth signature the way S3 does (moto does not check them)."""
    parts = urlsplit(request.path)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    received = params.pop(SIGNATURE, "")
    headers = {name.lower(): " ".join(value.split()) for name, value in request.headers.items()}
    signed = params["X-Amz-SignedHeaders"].split(";")
    canonical = "\n".join(
        [
            request.method,
            parts.path,
            "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items())),
            "".join(f"{name}:{headers.get(name, '')}\n" for name in signed),
            ";".join(signed),
            "UNSIGNED-PAYLOAD",
        ]
    )
    _, date, region, service, _ = params["X-Amz-Credential"].split("/")
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", params["X-Amz-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + SECRET).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, received)


def test_upload_keeps_the_presigned_signature_valid(server: ScriptedServer) -> None:
    def s3_like(request: Seen) -> Reply:
        if sigv4_query_signature_valid(request):
            return Reply(200)
        return Reply(403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>")

    server.routes["/klein-out/k.png"] = s3_like
    url = s3_client(server.url("")).generate_presigned_url(  # type: ignore[attr-defined]
        "put_object", Params={"Bucket": BUCKET, "Key": "k.png", "ContentType": "image/png"}, ExpiresIn=300
    )
    # Controls: the verifier accepts what boto3 signed and refuses a different Content-Type.
    assert requests.put(url, data=b"x", headers={"Content-Type": "image/png"}, timeout=5).status_code == 200
    assert requests.put(url, data=b"x", headers={"Content-Type": "image/webp"}, timeout=5).status_code == 403
    # A session with its own Authorization header must not leak it onto the presigned request.
    session = requests.Session()
    session.headers["Authorization"] = "Bearer should-not-be-sent"
    client(session=session).upload(url, b"payload", "image/png")
    sent = server.seen[-1]
    assert sent.body == b"payload"
    assert {name.lower() for name in sent.headers} <= {
        "host",
        "content-type",
        "content-length",
        "user-agent",
        "accept-encoding",
    }
    with pytest.raises(UploadFailed, match=r"HTTP 403 \(SignatureDoesNotMatch\)") as caught:
        client().upload(url, b"payload", "image/jpeg")
    assert caught.value.retryable is False


def test_upload_403_is_permanent_not_retried_and_not_logged_with_signature(
    server: ScriptedServer, s3: S3, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="worker")
    server.sequence(
        "/out.png", Reply(403, b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message>")
    )
    url = server.url("/out.png") + "?" + urlsplit(s3.presign("put_object", "out.png")).query
    with pytest.raises(UploadFailed) as caught:
        client().upload(url, b"data", "image/png")
    assert caught.value.retryable is False
    assert caught.value.code == "upload_failed"
    assert (
        caught.value.message
        == f"upload_url: upload of {server.url('/out.png')} failed: HTTP 403 (AccessDenied)"
    )
    assert len(server.seen) == 1
    assert SIGNATURE not in caplog.text
    assert SIGNATURE not in "".join(traceback.format_exception(caught.value))


def test_upload_503_is_retried(server: ScriptedServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="worker")
    server.sequence("/out.png", Reply(503, b"<Code>SlowDown</Code>"), Reply(200))
    url = server.url("/out.png?X-Amz-Signature=abc&X-Amz-Credential=AKIA")
    assert client().upload(url, b"data", "image/webp") == server.url("/out.png")
    assert [(seen.method, seen.body, seen.headers["Content-Type"]) for seen in server.seen] == [
        ("PUT", b"data", "image/webp")
    ] * 2
    assert "attempt 1/3" in caplog.text and "HTTP 503 (SlowDown)" in caplog.text
    assert SIGNATURE not in caplog.text and "AKIA" not in caplog.text


def test_upload_exhausted_retries_are_transient(server: ScriptedServer) -> None:
    server.sequence("/out.png", Reply(500))
    with pytest.raises(UploadFailed) as caught:
        client(attempts=2).upload(server.url("/out.png?X-Amz-Signature=abc"), b"data", "image/png")
    assert caught.value.retryable is True
    assert "after 2 attempts" in caught.value.message
    assert len(server.seen) == 2


# -- webhooks -----------------------------------------------------------------------------------


def test_post_json_retries_then_delivers(server: ScriptedServer) -> None:
    server.sequence("/hook", Reply(502), Reply(204))
    client().post_json(server.url("/hook"), b'{"id": "a"}', {"X-Signature": "sha256=ff"})
    assert len(server.seen) == 2
    last = server.seen[-1]
    assert (last.method, last.body) == ("POST", b'{"id": "a"}')
    assert last.headers["Content-Type"] == "application/json"
    assert last.headers["X-Signature"] == "sha256=ff"


def test_post_json_4xx_is_permanent(server: ScriptedServer) -> None:
    server.sequence("/hook", Reply(410))
    with pytest.raises(UploadFailed, match=r"^webhook_url: webhook POST of .* HTTP 410") as caught:
        client().post_json(server.url("/hook"), b"{}", {})
    assert caught.value.retryable is False
    assert len(server.seen) == 1


# -- DNS rebinding ------------------------------------------------------------------------------


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """A DNS server under the test's control for ``*.rebind.test`` names: each lookup pops the
    next answer (the last one repeats), like a rebinding server with TTL 0. Other names resolve
    as usual."""
    answers: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: object, port: object, *args: object, **kwargs: object) -> list:
        if isinstance(host, str) and host in answers:
            queue = answers[host]
            address = queue.pop(0) if len(queue) > 1 else queue[0]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def test_a_name_that_rebinds_to_loopback_after_the_check_is_not_connected_to(
    server: ScriptedServer, dns: dict[str, list[str]]
) -> None:
    server.sequence("/x.png", Reply(200, png_bytes(), {"Content-Type": "image/png"}))
    dns["evil.rebind.test"] = ["8.8.8.8", "127.0.0.1"]  # public for the check, loopback after
    guarded = client(allow_private_urls=False, attempts=1)
    with pytest.raises(InvalidInput, match="non-public address 127.0.0.1"):
        guarded.download_image(f"http://evil.rebind.test:{server.port}/x.png")
    assert server.seen == []  # the loopback server was never reached


def test_the_connection_goes_to_the_checked_address_with_the_host_name_kept(
    server: ScriptedServer, dns: dict[str, list[str]]
) -> None:
    server.sequence("/x.png", Reply(200, png_bytes(), {"Content-Type": "image/png"}))
    # Checked twice (early check, then at connect), then a different answer nobody may use.
    dns["cdn.rebind.test"] = ["127.0.0.1", "127.0.0.1", "10.9.9.9"]
    guarded = client(allow_private_urls=False, allowed_networks=["127.0.0.1/32"], attempts=1)
    assert guarded.download_image(f"http://cdn.rebind.test:{server.port}/x.png").size == (8, 6)
    (seen,) = server.seen
    assert seen.headers["Host"] == f"cdn.rebind.test:{server.port}"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_the_contracts_formats_decode(fmt: str) -> None:
    from handlers.imaging import decode_image

    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (10, 200, 30)).save(buf, format=fmt)
    assert decode_image(buf.getvalue(), max_pixels=1000).size == (12, 10)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "TGA", "PPM", "ICO"])
def test_other_image_formats_are_not_decoded(server: ScriptedServer, fmt: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format=fmt)
    server.sequence("/x", Reply(200, buf.getvalue(), {"Content-Type": "image/png"}))
    expected = r"^images: content is not a decodable PNG, JPEG or WebP image"
    with pytest.raises(InvalidInput, match=expected) as caught:
        client().download_image(server.url("/x"))
    assert caught.value.retryable is False


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A certificate for ``name`` (and its key), which the test then trusts as its own CA."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def test_https_to_the_pinned_address_keeps_sni_and_the_certificate_check(
    server: ScriptedServer, dns: dict[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl

    server.sequence("/x.png", Reply(200, png_bytes(), {"Content-Type": "image/png"}))
    cert_file, key_file = _self_signed(tmp_path, "cdn.rebind.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_file))  # trust this certificate only
    dns["cdn.rebind.test"] = ["127.0.0.1", "127.0.0.1", "10.9.9.9"]
    guarded = client(allow_private_urls=False, allowed_networks=["127.0.0.1/32"], attempts=1)
    # Connected to 127.0.0.1, yet the certificate is checked against the URL's name (it matches).
    assert guarded.download_image(f"https://cdn.rebind.test:{server.port}/x.png").size == (8, 6)
    assert server.seen[0].headers["Host"] == f"cdn.rebind.test:{server.port}"
    # The same server under another name that resolves to the same address: the name check fails.
    dns["other.rebind.test"] = ["127.0.0.1"]
    with pytest.raises(DownloadFailed):
        guarded.download_image(f"https://other.rebind.test:{server.port}/x.png")
