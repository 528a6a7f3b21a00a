"""The TOML file's sections (``[offers]``, ``[policy]``, ``[worker]``, ``[[queues]]``), each validated on
its own; ``provisioning/config.py`` puts them together with the top-level settings and their sources."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from provisioning.offers import VARIANT_MIN_VRAM_GB, OfferRequirements
from provisioning.policy_inputs import PolicyConfig
from provisioning.reconcile import PENDING_RENT_S
from provisioning.throughput import DEFAULT_IMAGES_PER_SECOND, DLPERF_IMAGES_PER_SECOND

_REQUIREMENTS = OfferRequirements()
_POLICY_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PolicyConfig)}
POLICY_FIELDS = frozenset(_POLICY_DEFAULTS)


def policy_default(name: str) -> Any:
    """PolicyConfig's default for ``name``: settings take it from there instead of a copy."""
    default = _POLICY_DEFAULTS[name]
    if default is dataclasses.MISSING:
        raise KeyError(f"PolicyConfig.{name} has no default")
    return default


class OfferSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str = Field(
        default="klein-4b", description=f"one of {', '.join(VARIANT_MIN_VRAM_GB)}: sets min VRAM"
    )
    min_vram_gb: float | None = None  # overrides the variant's figure
    # Defaults are OfferRequirements' own: one place says what an acceptable offer is.
    min_reliability: float = _REQUIREMENTS.min_reliability
    verified: bool = _REQUIREMENTS.verified
    # The image's torch CUDA build (the Dockerfile's CUDA_FLAVOUR, its io.klein-worker.cuda-flavour
    # label): hosts whose driver supports less are never rented. min_cuda overrides it.
    cuda_flavour: str = Field(default="cu128", pattern=r"^cu\d{3}$")
    min_cuda: float | None = None
    min_disk_gb: float = _REQUIREMENTS.min_disk_gb
    min_inet_down_mbps: float = _REQUIREMENTS.min_inet_down_mbps
    max_gpus: int = _REQUIREMENTS.max_gpus
    gpu_names: list[str] = Field(default_factory=list)
    bid_margin: float = _REQUIREMENTS.bid_margin


class PolicySettings(BaseModel):
    """``[policy]``: the scaling policy's tuning. Where a field is PolicyConfig's, so is its default: the
    pure policy says what its defaults are. The rest tune the reconciler and the throughput model."""

    model_config = ConfigDict(extra="forbid")
    scale_in_after_s: float = Field(default=policy_default("scale_in_after_s"), ge=0)
    min_instance_age_s: float = Field(default=policy_default("min_instance_age_s"), ge=0)
    boot_deadline_s: float = Field(default=policy_default("boot_deadline_s"), gt=0)
    avoid_machine_s: float = Field(default=policy_default("avoid_machine_s"), ge=0)
    max_rents_per_tick: int = Field(default=policy_default("max_rents_per_tick"), ge=1)
    max_per_host: int = Field(default=policy_default("max_per_host"), ge=1)
    images_per_job: float = Field(default=policy_default("images_per_job"), gt=0)
    # The reconciler's, not the policy's: a rent of unknown outcome counts this long.
    pending_rent_s: float = Field(default=PENDING_RENT_S, ge=0)
    cold_max_age_s: float = Field(default=policy_default("cold_max_age_s"), ge=0)
    resume_deadline_s: float = Field(default=policy_default("resume_deadline_s"), gt=0)
    fill_cold_pool: bool = policy_default("fill_cold_pool")
    unready_after_s: float = Field(default=policy_default("unready_after_s"), gt=0)
    profiles_dir: Path | None = None  # benchmark profile JSON files (scripts/benchmark_vram.py)
    dlperf_images_per_second: float = Field(default=DLPERF_IMAGES_PER_SECOND, gt=0)
    default_images_per_second: float = Field(default=DEFAULT_IMAGES_PER_SECOND, gt=0)

    def tuning(self) -> dict[str, Any]:
        """The fields that are PolicyConfig's, by name."""
        return {name: getattr(self, name) for name in type(self).model_fields if name in POLICY_FIELDS}


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    disk_gb: float = 40.0
    runtype: str = "args"
    onstart: str | None = None
    # The workers' /healthz port, exposed at rent and probed each tick (readiness.py); 0: not probed.
    health_port: int = Field(default=9100, ge=0, le=65535)  # the image's METRICS_PORT
    env: dict[str, str] = Field(default_factory=dict)  # literal values for the worker (MODEL, MAX_BATCH...)
    pass_env: list[str] = Field(
        default_factory=lambda: [
            "RESULT_QUEUE_URL",
            "AWS_REGION",
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "HF_TOKEN",
            "WEBHOOK_SECRET",
        ]
    )
    registry_user: str | None = None  # for a private image (GHCR: a user and a read:packages token)
    registry_token: SecretStr | None = None

    @model_validator(mode="after")
    def _onstart_needs_a_shell_mode(self) -> WorkerSettings:
        # In the "args" (entrypoint) mode Vast runs an on-start command in place of the image's
        # ENTRYPOINT: the worker would never start. docker/vast-onstart.sh is for the ssh/jupyter modes.
        if self.onstart and self.runtype == "args":
            raise ValueError(
                "worker.onstart: with worker.runtype = 'args' Vast runs it instead of the image's "
                "entrypoint, so no worker would start; drop onstart, or use runtype 'ssh' with "
                "onstart = 'klein-vast-onstart'"
            )
        return self


class QueueTarget(BaseModel):
    """One of the fleet's job queues (``[[queues]]`` in the TOML, highest priority first)."""

    model_config = ConfigDict(extra="forbid")
    url: str
    target_wait_s: float | None = Field(default=None, gt=0)  # None: the fleet's target_wait_s
