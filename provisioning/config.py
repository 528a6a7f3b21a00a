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

from pydantic import AliasChoices, Field, SecretStr, TypeAdapter, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from klein_facts.variants import KLEIN_MODELS
from provisioning.config_sections import (
    OfferSettings,
    PolicySettings,
    QueueTarget,
    WorkerSettings,
    policy_default,
)
from provisioning.launch_env import registry_login, worker_env
from provisioning.offers import VARIANT_MIN_VRAM_GB, OfferRequirements
from provisioning.policy_inputs import PolicyConfig
from provisioning.profile_figures import load_profiles
from provisioning.throughput import ThroughputModel
from provisioning.vast import DEFAULT_API_URL, LaunchSpec

PLACEHOLDER_OWNER = "OWNER"  # in the default image name: renting it would pull nothing


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
    min_instances: int = Field(policy_default("min_instances"), ge=0)
    # The fleet's own defaults from here to cold_mult (PolicyConfig's are neutral: 10, no cold pool).
    max_instances: int = Field(4, ge=0)
    # Stopped instances kept (disk billed) to resume on scale-out instead of renting; 0: destroy on scale-in.
    cold_pool: int = Field(6, ge=0)
    # ... or this many per live instance when more (Vast serverless' cold_mult): scale-in stops a burst's
    # fleet whole, so the next burst resumes it in ~90 s instead of renting for ~7 minutes. 0: the floor only.
    cold_mult: float = Field(2.5, ge=0)
    target_wait_s: float = Field(policy_default("target_wait_s"), gt=0)
    max_hourly_usd: float = Field(policy_default("max_hourly_usd"), ge=0)
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
        return PolicyConfig(
            image=self.image,
            min_instances=self.min_instances,
            max_instances=max(self.min_instances, self.max_instances),
            target_wait_s=self.target_wait_s,
            max_hourly_usd=self.max_hourly_usd,
            cold_pool=self.cold_pool,
            cold_mult=self.cold_mult,
            **self.policy.tuning(),
        )

    def throughput(self) -> ThroughputModel:
        profiles: dict[str, float] = {}
        if self.policy.profiles_dir:
            # Each card's figure is that of the profile its workers serve by (the same folder given to
            # them as BENCHMARK_PROFILE), chosen by the workers' own rule from their MODEL, QUANTIZATION,
            # ALLOW_NON_COMMERCIAL and TORCH_COMPILE ("auto" pins nothing).
            env = self.worker.env
            model = env.get("MODEL", "auto")
            quantization = env.get("QUANTIZATION", "auto")
            profiles = load_profiles(
                self.policy.profiles_dir,
                model=model if model in KLEIN_MODELS else None,
                quantization=None if quantization == "auto" else quantization,
                allow_non_commercial=_env_flag(env.get("ALLOW_NON_COMMERCIAL")) is True,
                compiled=_env_flag(env.get("TORCH_COMPILE")) is not False,
            )
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
        token = self.worker.registry_token
        env = worker_env(
            environ=environ,
            pass_env=self.worker.pass_env,
            literal=self.worker.env,
            queues=queues,
            health_port=self.worker.health_port,
            max_gpus=self.offers.max_gpus,
        )
        login = registry_login(
            self.image,
            user=self.worker.registry_user,
            token=token.get_secret_value() if token is not None else None,
        )
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


def _env_flag(value: str | None) -> bool | None:
    """A worker boolean (ALLOW_NON_COMMERCIAL, TORCH_COMPILE) read as the worker's settings read it;
    None when unset or not a boolean."""
    if value is None:
        return None
    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        return None
