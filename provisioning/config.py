"""Provisioning settings: command-line options over environment over a TOML file over defaults.

The only reader of the environment in this package. Environment names: ``VAST_API_URL``, ``VAST_API_KEY``,
``QUEUE_URL`` (one queue; several go in the TOML's ``[[queues]]``), ``AWS_ENDPOINT_URL``/``AWS_REGION``
(to read the queues), and ``KLEIN_FLEET_<FIELD>`` for the rest (nested with ``__``:
``KLEIN_FLEET_POLICY__BOOT_DEADLINE_S``). The worker's own secrets (AWS keys, HF token) are read from the
operator's environment by name (``worker.pass_env``) and handed to the rented containers; they are never
printed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from provisioning.offers import VARIANT_MIN_VRAM_GB, OfferRequirements
from provisioning.policy import PolicyConfig
from provisioning.throughput import (
    DEFAULT_IMAGES_PER_SECOND,
    DLPERF_IMAGES_PER_SECOND,
    ThroughputModel,
    load_profiles,
)
from provisioning.vast import DEFAULT_API_URL, LaunchSpec

_REQUIREMENTS = OfferRequirements()
PLACEHOLDER_OWNER = "OWNER"  # in the default image name: renting it would pull nothing

# Names of environment variables whose values are credentials: shown as *** anywhere they are printed.
_SECRET_MARKERS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")


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
    bid_margin: float = 0.10


class PolicySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale_in_after_s: float = Field(default=300.0, ge=0)
    min_instance_age_s: float = Field(default=600.0, ge=0)
    boot_deadline_s: float = Field(default=1200.0, gt=0)
    avoid_machine_s: float = Field(default=3600.0, ge=0)
    max_rents_per_tick: int = Field(default=4, ge=1)
    max_per_host: int = Field(default=2, ge=1)
    images_per_job: float = Field(default=1.0, gt=0)
    pending_rent_s: float = Field(default=900.0, ge=0)  # a rent of unknown outcome counts this long
    cold_max_age_s: float = Field(default=6 * 3600.0, ge=0)  # a cold instance older than this is destroyed
    resume_deadline_s: float = Field(default=300.0, gt=0)  # a resume not running by then: destroy, rent
    fill_cold_pool: bool = True  # when demand is met, rent to fill the cold pool (they boot, then stop)
    unready_after_s: float = Field(default=180.0, gt=0)  # a worker not answering /healthz this long: replace
    profiles_dir: Path | None = None  # benchmark profile JSON files (scripts/benchmark_vram.py)
    dlperf_images_per_second: float = Field(default=DLPERF_IMAGES_PER_SECOND, gt=0)
    default_images_per_second: float = Field(default=DEFAULT_IMAGES_PER_SECOND, gt=0)


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


class FleetSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KLEIN_FLEET_", env_nested_delimiter="__", extra="forbid")

    vast_api_url: str = Field(DEFAULT_API_URL, validation_alias=AliasChoices("vast_api_url", "VAST_API_URL"))
    vast_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("vast_api_key", "VAST_API_KEY")
    )
    fleet: str = "klein"
    image: str = f"ghcr.io/{PLACEHOLDER_OWNER}/klein-worker:latest"
    queue_url: str | None = Field(None, validation_alias=AliasChoices("queue_url", "QUEUE_URL"))
    # Several job queues, highest priority first (the workers get them as QUEUE_URLS); or queue_url.
    queues: list[QueueTarget] = Field(default_factory=list)
    aws_endpoint_url: str | None = Field(
        None, validation_alias=AliasChoices("aws_endpoint_url", "AWS_ENDPOINT_URL")
    )
    aws_region: str | None = Field(None, validation_alias=AliasChoices("aws_region", "AWS_REGION"))
    min_instances: int = Field(0, ge=0)
    max_instances: int = Field(4, ge=0)
    # Stopped instances kept (disk billed) to resume on scale-out instead of renting; 0: destroy on scale-in.
    cold_pool: int = Field(6, ge=0)
    # ... or this many per live instance when more (Vast serverless' cold_mult): scale-in stops a burst's
    # fleet whole, so the next burst resumes it in ~90 s instead of renting for ~7 minutes. 0: the floor only.
    cold_mult: float = Field(2.5, ge=0)
    target_wait_s: float = Field(120.0, gt=0)
    max_hourly_usd: float = Field(5.0, ge=0)
    max_price_per_gpu_hour: float | None = Field(1.0, gt=0)
    interruptible: bool = False
    interval_s: float = Field(60.0, gt=0)
    state_file: Path | None = None
    offers: OfferSettings = Field(default_factory=lambda: OfferSettings())
    policy: PolicySettings = Field(default_factory=lambda: PolicySettings())
    worker: WorkerSettings = Field(default_factory=lambda: WorkerSettings())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Command line (init) over environment over the TOML file named by `--config`.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    @model_validator(mode="after")
    def _one_queue_form(self) -> FleetSettings:
        self.queue_targets()  # queue_url and queues together, or a queue listed twice: a config error
        return self

    def queue_targets(self) -> list[QueueTarget]:
        """The job queues to follow, highest priority first; empty when none is configured."""
        if self.queues and self.queue_url:
            raise ValueError("set queue_url (one queue) or queues (several, highest first), not both")
        if not self.queues:
            return [QueueTarget(url=self.queue_url)] if self.queue_url else []
        urls = [q.url for q in self.queues]
        if len(set(urls)) != len(urls):
            raise ValueError("queues lists the same queue twice")
        return list(self.queues)

    def requirements(self) -> OfferRequirements:
        o = self.offers
        if o.min_vram_gb is None and o.variant not in VARIANT_MIN_VRAM_GB:
            raise ValueError(f"offers.variant {o.variant!r} is not one of {sorted(VARIANT_MIN_VRAM_GB)}")
        return OfferRequirements(
            min_vram_gb=o.min_vram_gb if o.min_vram_gb is not None else VARIANT_MIN_VRAM_GB[o.variant],
            min_reliability=o.min_reliability,
            verified=o.verified,
            min_cuda=o.min_cuda if o.min_cuda is not None else flavour_min_cuda(o.cuda_flavour),
            min_disk_gb=max(o.min_disk_gb, self.worker.disk_gb),
            min_inet_down_mbps=o.min_inet_down_mbps,
            max_gpus=o.max_gpus,
            gpu_names=tuple(o.gpu_names),
            max_price_per_gpu_hour=self.max_price_per_gpu_hour,
            interruptible=self.interruptible,
            bid_margin=o.bid_margin,
        )

    def policy_config(self) -> PolicyConfig:
        p = self.policy
        return PolicyConfig(
            image=self.image,
            min_instances=self.min_instances,
            max_instances=max(self.min_instances, self.max_instances),
            target_wait_s=self.target_wait_s,
            max_hourly_usd=self.max_hourly_usd,
            scale_in_after_s=p.scale_in_after_s,
            min_instance_age_s=p.min_instance_age_s,
            boot_deadline_s=p.boot_deadline_s,
            avoid_machine_s=p.avoid_machine_s,
            max_rents_per_tick=p.max_rents_per_tick,
            max_per_host=p.max_per_host,
            images_per_job=p.images_per_job,
            cold_pool=self.cold_pool,
            cold_mult=self.cold_mult,
            cold_max_age_s=p.cold_max_age_s,
            resume_deadline_s=p.resume_deadline_s,
            unready_after_s=p.unready_after_s,
            fill_cold_pool=p.fill_cold_pool,
        )

    def throughput(self) -> ThroughputModel:
        profiles: dict[str, float] = {}
        if self.policy.profiles_dir:
            # Only the variant the rented workers run, when the fleet pins MODEL ("auto" pins nothing).
            model = self.worker.env.get("MODEL")
            if model in ("klein-4b", "klein-9b"):
                quantization = self.worker.env.get("QUANTIZATION", "auto")
                if quantization == "auto":
                    # worker.boot.default_quantization's rule, restated: this package must not
                    # import the worker (test_cli_import_pulls_in_no_torch_and_no_worker).
                    quantization = "fp8" if model == "klein-9b" else "none"
                profiles = load_profiles(self.policy.profiles_dir, model=model, quantization=quantization)
            else:
                profiles = load_profiles(self.policy.profiles_dir)
        return ThroughputModel(
            profiles=profiles,
            dlperf_images_per_second=self.policy.dlperf_images_per_second,
            default_images_per_second=self.policy.default_images_per_second,
        )

    def launch_spec(self, environ: Mapping[str, str] | None = None) -> LaunchSpec:
        """What rented containers run; secrets named in ``worker.pass_env`` come from the environment."""
        queues = [q.url for q in self.queue_targets()]
        if not queues:
            raise ValueError("a queue URL is needed to rent workers: --queue-url, QUEUE_URL or queue_url")
        if PLACEHOLDER_OWNER in self.image:
            raise ValueError(f"image: {self.image!r} is the placeholder; set the worker image you pushed")
        environ = os.environ if environ is None else environ
        env = {name: environ[name] for name in self.worker.pass_env if environ.get(name)}
        env.update(self.worker.env)
        if len(queues) == 1:
            env["QUEUE_URL"] = queues[0]
        else:
            env["QUEUE_URLS"] = ",".join(queues)
        if self.worker.health_port:
            port = self.worker.health_port
            env["METRICS_PORT"] = str(port)
            # How Vast's env carries a port mapping (as `vastai --env`). One per GPU the offers allow: the
            # entrypoint gives the worker on GPU k the port METRICS_PORT+k, and each is probed.
            for slot in range(max(1, self.offers.max_gpus)):
                env[f"-p {port + slot}:{port + slot}"] = "1"
        login = None
        if self.worker.registry_token is not None:
            registry = self.image.split("/", 1)[0] if "/" in self.image else "docker.io"
            user = self.worker.registry_user or "token"
            login = f"-u {user} -p {self.worker.registry_token.get_secret_value()} {registry}"
        return LaunchSpec(
            image=self.image,
            label=self.fleet,
            env=env,
            disk_gb=self.worker.disk_gb,
            runtype=self.worker.runtype,
            onstart=self.worker.onstart,
            image_login=login,
        )

    def api_key(self, home: Path | None = None) -> tuple[str, str]:
        """(key, where it came from): VAST_API_KEY / the config file, else the file `vastai set api-key`
        writes (``~/.config/vastai/vast_api_key``, older clients ``~/.vast_api_key``); ("", "no key")."""
        if self.vast_api_key is not None and self.vast_api_key.get_secret_value().strip():
            source = "VAST_API_KEY" if os.environ.get("VAST_API_KEY") else "vast_api_key in the settings"
            return self.vast_api_key.get_secret_value().strip(), source
        home = Path.home() if home is None else home
        for path in (home / ".config" / "vastai" / "vast_api_key", home / ".vast_api_key"):
            try:
                key = path.read_text(encoding="utf-8").strip()
            except OSError:
                continue
            if key:
                return key, str(path)
        return "", "no key"

    def state_path(self, environ: Mapping[str, str] | None = None) -> Path:
        if self.state_file is not None:
            return self.state_file
        environ = os.environ if environ is None else environ
        base = Path(environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        return base / "klein-fleet" / f"{self.fleet}.json"


def flavour_min_cuda(flavour: str) -> float:
    """ "cu128" -> 12.8, "cu130" -> 13.0: the CUDA version a torch build needs from the host driver."""
    digits = flavour.removeprefix("cu")
    return float(f"{digits[:-1]}.{digits[-1]}")


def load_settings(config_file: Path | None = None, **overrides: Any) -> FleetSettings:
    """Settings from ``overrides`` (the command line; None means "not given"), env, then the TOML file."""
    values = {k: v for k, v in overrides.items() if v is not None}
    if config_file is None:
        return FleetSettings(**values)
    if not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")

    class _FromFile(FleetSettings):
        model_config = SettingsConfigDict(toml_file=config_file)

    return _FromFile(**values)


def masked_env(env: Mapping[str, str]) -> dict[str, str]:
    """The env for display: credential-looking values replaced by ***."""
    return {k: "***" if any(m in k.upper() for m in _SECRET_MARKERS) else v for k, v in env.items()}
