"""The job queue's backlog, from SQS's approximate counts (boto3; any SQS-compatible endpoint)."""

from __future__ import annotations

from typing import Any

from provisioning.models import QueueSample

_ATTRIBUTES = [
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
]


class SqsBacklog:
    """Samples one queue. ``client`` is a boto3 SQS client, built by the caller (``make_sqs_client``)."""

    def __init__(self, *, client: Any, queue_url: str) -> None:
        self._client = client
        self._queue_url = queue_url

    def sample(self, *, now: float) -> QueueSample:
        reply = self._client.get_queue_attributes(QueueUrl=self._queue_url, AttributeNames=_ATTRIBUTES)
        attrs = reply.get("Attributes", {})
        return QueueSample(
            at=now,
            visible=int(attrs.get("ApproximateNumberOfMessages", 0)),
            in_flight=int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
            delayed=int(attrs.get("ApproximateNumberOfMessagesDelayed", 0)),
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
