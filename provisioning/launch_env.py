"""What the rented containers are given: their environment (the operator's secrets passed through by
name, the fleet's literal values, the queue URLs, the health ports) and the registry login; and that
environment made fit to print."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Names of environment variables whose values are credentials: shown as *** anywhere they are printed.
_SECRET_MARKERS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")


def worker_env(
    *,
    environ: Mapping[str, str],
    pass_env: Sequence[str],
    literal: Mapping[str, str],
    queues: Sequence[str],
    health_port: int,
    max_gpus: int,
) -> dict[str, str]:
    """The containers' env: ``pass_env`` names read from ``environ`` (set ones only), then ``literal``
    (MODEL, MAX_BATCH...), the queue URLs, and METRICS_PORT with one port mapping per GPU."""
    env = {name: environ[name] for name in pass_env if environ.get(name)}
    env.update(literal)
    if len(queues) == 1:
        env["QUEUE_URL"] = queues[0]
    else:
        env["QUEUE_URLS"] = ",".join(queues)
    if health_port:
        env["METRICS_PORT"] = str(health_port)
        # How Vast's env carries a port mapping (as `vastai --env`). One per GPU the offers allow: the
        # entrypoint gives the worker on GPU k the port METRICS_PORT+k, and each is probed.
        for slot in range(max(1, max_gpus)):
            env[f"-p {health_port + slot}:{health_port + slot}"] = "1"
    return env


def registry_login(image: str, *, user: str | None, token: str | None) -> str | None:
    """Vast's ``image_login`` for a private image (``-u USER -p TOKEN REGISTRY``); None without a token."""
    if token is None:
        return None
    registry = image.split("/", 1)[0] if "/" in image else "docker.io"
    return f"-u {user or 'token'} -p {token} {registry}"


def masked_env(env: Mapping[str, str]) -> dict[str, str]:
    """The env for display: credential-looking values replaced by ***."""
    return {k: "***" if any(m in k.upper() for m in _SECRET_MARKERS) else v for k, v in env.items()}
