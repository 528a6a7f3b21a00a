"""Operator helper: push job JSON onto the queue, presigning s3:// URLs on request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from worker.config import Settings
from worker.sqs import make_sqs_client


def _split(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def presign_job(job: dict[str, Any], s3: Any, *, expires: int) -> dict[str, Any]:
    def presign(url: str, operation: str) -> str:
        if not url.startswith("s3://"):
            return url
        bucket, key = _split(url)
        params = {"Bucket": bucket, "Key": key}
        return s3.generate_presigned_url(operation, Params=params, ExpiresIn=expires)

    def put(url: str) -> str:
        return presign(url, "put_object")

    def get(url: str) -> str:
        return presign(url, "get_object")

    job = json.loads(json.dumps(job))  # deep copy
    inp = job.get("input", {})
    if isinstance(inp.get("upload_urls"), list):
        inp["upload_urls"] = [put(u) for u in inp["upload_urls"]]
    if isinstance(inp.get("upload_url"), str):
        inp["upload_url"] = put(inp["upload_url"])
    if isinstance(inp.get("images"), list):
        inp["images"] = [
            {**img, "url": get(img["url"])} if isinstance(img, dict) else img for img in inp["images"]
        ]
    if isinstance(inp.get("image_url"), str):
        inp["image_url"] = get(inp["image_url"])
    return job


def enqueue_jobs(
    settings: Settings, jobs: list[dict[str, Any]], *, presign: bool, expires: int = 3600
) -> Iterator[tuple[str, str]]:
    import boto3
    from botocore.config import Config

    sqs = make_sqs_client(region=settings.aws_region, endpoint_url=settings.aws_endpoint_url)
    s3 = boto3.client(
        "s3",
        region_name=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        config=Config(signature_version="s3v4"),
    )
    queue_url = settings.require_queue()
    for job in jobs:
        body = presign_job(job, s3, expires=expires) if presign else job
        reply = sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(body))
        yield str(job.get("id")), reply["MessageId"]
