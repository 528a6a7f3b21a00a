"""The job queues' backlog, from SQS's approximate counts (boto3; any SQS-compatible endpoint)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from provisioning.models import QueueDepth, QueueSample

_ATTRIBUTES = [
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
]


class SqsBacklog:
    """Samples the fleet's job queues: ``queue_url`` (one queue), or ``queues`` as (url, target wait or
    None) highest priority first, as the workers' QUEUE_URLS lists them. ``client`` is a boto3 SQS client,
    built by the caller (``make_sqs_client``); every queue is read through it."""

    def __init__(
        self,
        *,
        client: Any,
        queue_url: str | None = None,
        queues: Sequence[tuple[str, float | None]] = (),
    ) -> None:
        if bool(queue_url) == bool(queues):
            raise ValueError("SqsBacklog needs queue_url or queues, not both")
        self._client = client
        self._queues = list(queues) if queues else [(str(queue_url), None)]

    def sample(self, *, now: float) -> QueueSample:
        depths = tuple(self._depth(url, target) for url, target in self._queues)
        return QueueSample(
            at=now,
            visible=sum(d.visible for d in depths),
            in_flight=sum(d.in_flight for d in depths),
            delayed=sum(d.delayed for d in depths),
            queues=depths,
        )

    def _depth(self, url: str, target_wait_s: float | None) -> QueueDepth:
        reply = self._client.get_queue_attributes(QueueUrl=url, AttributeNames=_ATTRIBUTES)
        attrs = reply.get("Attributes", {})
        return QueueDepth(
            url=url,
            visible=int(attrs.get("ApproximateNumberOfMessages", 0)),
            in_flight=int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
            delayed=int(attrs.get("ApproximateNumberOfMessagesDelayed", 0)),
            target_wait_s=target_wait_s,
        )


def make_sqs_client(*, queue_url: str, endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A boto3 SQS client for ``queue_url``; the region comes from the URL when not given."""
    import boto3  # deferred: `offers` and `simulate` never need boto3's import time

    if region is None:
        region = _region_from_url(queue_url)
    return boto3.client("sqs", endpoint_url=endpoint_url, region_name=region)


def _region_from_url(queue_url: str) -> str | None:
    # https://sqs.eu-west-1.amazonaws.com/123/q -> eu-west-1; other endpoints leave it to boto3's defaults.
    host = queue_url.split("://", 1)[-1].split("/", 1)[0]
    parts = host.split(".")
    return parts[1] if len(parts) > 3 and parts[0] == "sqs" and parts[-2] == "amazonaws" else None
