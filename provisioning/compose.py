"""Builds what a command needs from the settings: composition only, no decisions."""

from __future__ import annotations

import dataclasses

from provisioning import coldpool
from provisioning.autoscale import Autoscaler
from provisioning.backlog import SqsBacklog, make_sqs_client
from provisioning.config import FleetSettings
from provisioning.reconcile import Reconciler
from provisioning.state import StateFile
from provisioning.vast import VastClient


class SetupError(ValueError):
    """The settings cannot support the command (no API key, no queue to follow)."""


def vast_client(settings: FleetSettings, *, need_key: bool = True) -> VastClient:
    key, source = settings.api_key()
    if not key and need_key:
        raise SetupError("no Vast API key: set VAST_API_KEY or run `vastai set api-key KEY`")
    return VastClient(api_key=key, api_url=settings.vast_api_url, key_source=source)


def sqs_backlog(settings: FleetSettings) -> SqsBacklog | None:
    targets = settings.queue_targets()
    if not targets:
        return None
    client = make_sqs_client(
        queue_url=targets[0].url, endpoint_url=settings.aws_endpoint_url, region=settings.aws_region
    )
    return SqsBacklog(client=client, queues=[(t.url, t.target_wait_s) for t in targets])


def autoscaler(
    settings: FleetSettings, *, manual_size: int | None = None, persist: bool = True, apply: bool = True
) -> Autoscaler:
    """The autoscaler; ``manual_size`` pins the size (`scale --to`); ``apply=False`` only plans (`status`)."""
    policy = settings.policy_config()
    if manual_size is not None:
        policy = dataclasses.replace(
            policy,
            min_instances=manual_size,
            max_instances=manual_size,
            manual=True,
            max_rents_per_tick=max(1, manual_size),
            # The pool as autoscale may hold it at most: pinning the size must not destroy a pool that
            # a burst grew (the pool is relative to the fleet's max_instances, not to N).
            cold_pool=coldpool.pool_ceiling(
                policy.cold_pool, policy.cold_mult, max_instances=policy.max_instances
            ),
        )
    vast = vast_client(settings)
    reconciler = None
    if apply:
        if not settings.queue_targets():
            raise SetupError("a queue URL is needed to rent workers: --queue-url, QUEUE_URL or queue_url")
        reconciler = Reconciler(
            client=vast,
            launch=settings.launch_spec(),
            max_hourly_usd=settings.max_hourly_usd,
            interruptible=settings.interruptible,
            pending_rent_s=settings.policy.pending_rent_s,
        )
    return Autoscaler(
        vast=vast,
        backlog=sqs_backlog(settings),
        label=settings.fleet,
        policy=policy,
        requirements=settings.requirements(),
        throughput=settings.throughput(),
        reconciler=reconciler,
        state=StateFile(path=settings.state_path()) if persist else None,
        # A dry run reads what the real runs remember (history, a held image) and writes nothing back.
        memory=None if persist else StateFile(path=settings.state_path()).load(),
        health_port=settings.worker.health_port,
    )
