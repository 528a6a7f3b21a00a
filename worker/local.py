"""The embedded local stack for `worker demo` and tests: moto's real SQS + S3 HTTP server on loopback."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config

log = logging.getLogger(__name__)

LOCAL_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
LOCAL_REGION = "us-east-1"


@dataclass
class LocalStack:
    server: Any
    endpoint: str
    queue_url: str
    result_queue_url: str
    dlq_url: str
    bucket: str
    high_queue_url: str | None = None  # `worker demo`: a higher-priority queue in front of queue_url

    def client(self, service: str) -> Any:
        # SigV4 presigned URLs (X-Amz-Signature=...), as real S3 hands out.
        config = Config(signature_version="s3v4", s3={"addressing_style": "path"})
        return boto3.client(
            service, endpoint_url=self.endpoint, region_name=LOCAL_REGION, config=config, **LOCAL_CREDENTIALS
        )

    def env(self) -> dict[str, str]:
        """Environment for a worker process pointed at this stack."""
        queues = (
            {"QUEUE_URLS": f"{self.high_queue_url},{self.queue_url}"}
            if self.high_queue_url
            else {"QUEUE_URL": self.queue_url}
        )
        return {
            **queues,
            "RESULT_QUEUE_URL": self.result_queue_url,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": LOCAL_REGION,
            "AWS_ACCESS_KEY_ID": LOCAL_CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": LOCAL_CREDENTIALS["aws_secret_access_key"],
            "ALLOW_PRIVATE_URLS": "true",
        }

    def presign_put(self, key: str, content_type: str | None = None, expires: int = 3600) -> str:
        params: dict[str, str] = {"Bucket": self.bucket, "Key": key}
        if content_type:
            params["ContentType"] = content_type
        return self.client("s3").generate_presigned_url("put_object", Params=params, ExpiresIn=expires)

    def presign_get(self, key: str, expires: int = 3600) -> str:
        return self.client("s3").generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires
        )

    def fresh(self, queue: str) -> LocalStack:
        """Another set of queues on the same server (isolation between tests)."""
        queue_url, result_url, dlq_url = create_queues(self.client("sqs"), queue)
        return LocalStack(self.server, self.endpoint, queue_url, result_url, dlq_url, self.bucket)

    def stop(self) -> None:
        self.server.stop()


def create_queues(sqs: Any, queue: str, *, max_receive_count: int = 5) -> tuple[str, str, str]:
    """The job queue (redriving to a DLQ after ``max_receive_count`` receives) and a result queue."""
    dlq_url = sqs.create_queue(QueueName=f"{queue}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)})
    queue_url = sqs.create_queue(
        QueueName=queue, Attributes={"RedrivePolicy": redrive, "VisibilityTimeout": "120"}
    )["QueueUrl"]
    result_url = sqs.create_queue(QueueName=f"{queue}-results")["QueueUrl"]
    return queue_url, result_url, dlq_url


def start_local_stack(
    *,
    bucket: str = "klein-demo",
    queue: str = "klein-jobs",
    max_receive_count: int = 5,
    high_priority: bool = False,
) -> LocalStack:
    """Start moto on a free loopback port; create the job queue (redriving to a DLQ), results, a bucket;
    with ``high_priority``, also ``<queue>-high`` in front of it (``env()`` then sets QUEUE_URLS)."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO, through a handler of its own when logging is not yet
    # configured: the demo would print moto's access lines between its job table and results.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name=LOCAL_REGION, **LOCAL_CREDENTIALS)
    queue_url, result_url, dlq_url = create_queues(sqs, queue, max_receive_count=max_receive_count)
    high_url = None
    if high_priority:
        redrive = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["RedrivePolicy"])
        attributes = {"RedrivePolicy": redrive["Attributes"]["RedrivePolicy"], "VisibilityTimeout": "120"}
        high_url = sqs.create_queue(QueueName=f"{queue}-high", Attributes=attributes)["QueueUrl"]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=LOCAL_REGION, **LOCAL_CREDENTIALS)
    s3.create_bucket(Bucket=bucket)
    log.info("local SQS + S3 on %s", endpoint)
    return LocalStack(server, endpoint, queue_url, result_url, dlq_url, bucket, high_url)
