"""Shared fixtures: a real moto SQS + S3 server for the session, tiny engines built once."""

from __future__ import annotations

import itertools
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
    logging.captureWarnings(False)  # configure_logging turns it on; the next test's turns it on anew
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in logging.root.manager.loggerDict:
        logging.getLogger(name).setLevel(levels.get(name, logging.NOTSET))


@pytest.fixture(autouse=True)
def _default_compile_stance() -> Iterator[None]:
    """A compiled engine's warm-up sets dynamo's process-wide stance to eager_on_recompile, and a
    boot with a compile cache turns caching precompile on; put both back so the next test's
    compiled graphs compile as usual."""
    yield
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.compiler.set_stance("default")
        # A compile cache's boot turns caching precompile on for the process (compile_cache.py).
        torch._dynamo.config.caching_precompile = False


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
