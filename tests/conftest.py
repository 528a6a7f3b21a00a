"""Shared fixtures: a real moto SQS + S3 server for the session, tiny engines built once."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

# Tests talk to loopback moto only; never pick up a developer's real AWS profile.
os.environ.update(
    {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
)
os.environ.pop("AWS_PROFILE", None)

from provisioning.vast import VastClient
from tests.fake_vast import FakeVast
from tests.scripted_http import ScriptedServer
from worker.local import LocalStack, start_local_stack

_names = itertools.count()


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """CLIs under test (worker, provisioning, benchmark) configure process-wide logging when run
    in-process; put root handlers and every logger's level back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in logging.root.manager.loggerDict:
        logging.getLogger(name).setLevel(levels.get(name, logging.NOTSET))


@pytest.fixture(autouse=True)
def _default_compile_stance() -> Iterator[None]:
    """A compiled engine's warm-up sets dynamo's process-wide stance to eager_on_recompile; put it
    back so the next test's compiled graphs compile as usual."""
    yield
    if "torch" in sys.modules:
        sys.modules["torch"].compiler.set_stance("default")


@pytest.fixture(scope="session")
def moto_stack() -> Iterator[LocalStack]:
    stack = start_local_stack(bucket="test-bucket")
    yield stack
    stack.stop()


@pytest.fixture
def stack(moto_stack: LocalStack) -> LocalStack:
    """Fresh queues (with DLQ and result queue) for each test, on the session's server."""
    return moto_stack.fresh(f"t{next(_names)}-{os.getpid()}")


@pytest.fixture(scope="session")
def engines() -> Any:
    from worker.boot import build_engines
    from worker.config import Settings
    from worker.variant import Variant

    settings = Settings(model="tiny", device="cpu")
    return build_engines(settings, Variant("tiny", "none", "cpu", "tests"))


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    yield server
    server.close()


def worker_settings(stack: LocalStack, **overrides: Any) -> Any:
    from worker.config import Settings

    values: dict[str, Any] = {
        "queue_url": stack.queue_url,
        "result_queue_url": stack.result_queue_url,
        "aws_endpoint_url": stack.endpoint,
        "allow_private_urls": True,
        "model": "tiny",
        "device": "cpu",
        "wait_time_seconds": 0,
        "retry_backoff_seconds": 0,
        "worker_id": "test-worker",
    }
    values.update(overrides)
    return Settings(**values)


def run_worker(stack: LocalStack, engines: Any, **overrides: Any) -> int:
    """Run the real worker in burst mode until the queue is empty; returns jobs finished."""
    from worker.app import build_runner

    runner = build_runner(worker_settings(stack, **overrides), engines=engines)
    return runner.run(burst=True)


ROOT = Path(__file__).resolve().parent.parent


def spawn_worker(stack: LocalStack, **env: Any) -> subprocess.Popen[str]:
    """`python -m worker` as a real process on the tiny model, pointed at ``stack``; ``env`` overrides."""
    full = {
        **os.environ,
        **stack.env(),
        "MODEL": "tiny",
        "DEVICE": "cpu",
        "WAIT_TIME_SECONDS": "1",
        "LOG_FORMAT": "json",
        "WORKER_ID": "proc-worker",
        "PYTHONUNBUFFERED": "1",
        **{k: str(v) for k, v in env.items()},
    }
    return subprocess.Popen(
        [sys.executable, "-m", "worker"],
        cwd=ROOT,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def send(stack: LocalStack, job: dict[str, Any] | str) -> str:
    body = job if isinstance(job, str) else json.dumps(job)
    return stack.client("sqs").send_message(QueueUrl=stack.queue_url, MessageBody=body)["MessageId"]


def results(stack: LocalStack, expected: int | None = None, wait: int = 1) -> list[dict[str, Any]]:
    sqs = stack.client("sqs")
    found: list[dict[str, Any]] = []
    for _ in range(20):
        reply = sqs.receive_message(
            QueueUrl=stack.result_queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait
        )
        messages = reply.get("Messages", [])
        for message in messages:
            found.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=stack.result_queue_url, ReceiptHandle=message["ReceiptHandle"])
        if (expected is not None and len(found) >= expected) or (expected is None and not messages):
            break
    return found


def queue_counts(stack: LocalStack, queue_url: str | None = None) -> tuple[int, int]:
    attrs = stack.client("sqs").get_queue_attributes(
        QueueUrl=queue_url or stack.queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def s3_image(stack: LocalStack, key: str) -> tuple[Image.Image, str, bytes]:
    obj = stack.client("s3").get_object(Bucket=stack.bucket, Key=key)
    data = obj["Body"].read()
    return Image.open(io.BytesIO(data)), obj["ContentType"], data


# -- the deployed path on a CPU (tests/production.py) -------------------------------------------


@pytest.fixture(scope="session")
def klein_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline written with save_pretrained: what MODEL_PATH points at in production."""
    from tests.production import write_klein_folder  # torch: only for the tests that use it

    return write_klein_folder(tmp_path_factory.mktemp("weights") / "FLUX.2-klein-4B")


@pytest.fixture(scope="session")
def weights_host() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def weight_urls(weights_host: ScriptedServer) -> dict[int, str]:
    """Real-ESRGAN-layout x2/x4 checkpoints over loopback HTTP, as UPSCALER_WEIGHTS_X2/_X4 URLs."""
    from tests.production import serve_checkpoints

    return serve_checkpoints(weights_host)


@pytest.fixture
def fake() -> Iterator[FakeVast]:
    """The fake Vast.ai API on loopback, one per test (the provisioning tests)."""
    with FakeVast() as server:
        yield server


@pytest.fixture
def client(fake: FakeVast) -> VastClient:
    """A Vast client on ``fake``, without retry sleeps; a test module may define its own."""
    return VastClient(api_key=fake.api_key, api_url=fake.url, backoff_s=0.0, sleep=lambda s: None)
