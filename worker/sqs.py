"""SQS implementation of ``JobSource`` and ``ResultSink`` (boto3). The only module that speaks SQS."""

from __future__ import annotations

import logging
from typing import Any

from botocore.exceptions import ClientError

from worker.queue import Message

log = logging.getLogger(__name__)

MAX_VISIBILITY = 43_200  # SQS caps ChangeMessageVisibility at 12 hours
_GONE_CODES = {"ReceiptHandleIsInvalid", "InvalidParameterValue", "MessageNotInflight"}


class SqsJobSource:
    def __init__(self, *, client: Any, queue_url: str, visibility_timeout: int) -> None:
        self._client = client
        self._queue_url = queue_url
        self._visibility = visibility_timeout

    @property
    def queue_url(self) -> str:
        return self._queue_url

    def receive(self, *, max_messages: int, wait_seconds: int) -> list[Message]:
        reply = self._client.receive_message(
            QueueUrl=self._queue_url,
            MaxNumberOfMessages=max(1, min(10, max_messages)),
            WaitTimeSeconds=wait_seconds,
            VisibilityTimeout=self._visibility,
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
        )
        return [_to_message(m, self._queue_url) for m in reply.get("Messages", [])]

    def extend(self, message: Message, seconds: int) -> None:
        self._change_visibility(message, min(seconds, MAX_VISIBILITY))

    def release(self, message: Message, delay_seconds: int = 0) -> None:
        self._change_visibility(message, max(0, min(delay_seconds, MAX_VISIBILITY)))

    def delete(self, message: Message) -> None:
        self._client.delete_message(QueueUrl=self._queue_url, ReceiptHandle=message.receipt)

    def _change_visibility(self, message: Message, seconds: int) -> None:
        try:
            self._client.change_message_visibility(
                QueueUrl=self._queue_url, ReceiptHandle=message.receipt, VisibilityTimeout=seconds
            )
        except ClientError as exc:
            # The message was already deleted or its receipt expired: nothing left to change.
            code = exc.response.get("Error", {}).get("Code", "")
            if code.split(".")[-1] not in _GONE_CODES:
                raise
            log.warning("visibility change skipped for %s: %s", message.message_id, code)


class SqsResultSink:
    def __init__(self, *, client: Any, queue_url: str) -> None:
        self._client = client
        self._queue_url = queue_url

    def send(self, body: str) -> None:
        self._client.send_message(QueueUrl=self._queue_url, MessageBody=body)


def _to_message(raw: dict[str, Any], queue_url: str) -> Message:
    attrs = raw.get("Attributes", {})
    sent = attrs.get("SentTimestamp")
    return Message(
        message_id=raw["MessageId"],
        receipt=raw["ReceiptHandle"],
        body=raw.get("Body", ""),
        receive_count=int(attrs.get("ApproximateReceiveCount", "1")),
        sent_at=int(sent) / 1000.0 if sent else None,
        queue=queue_url,
    )


def make_sqs_client(*, region: str, endpoint_url: str | None = None) -> Any:
    import boto3
    from botocore.config import Config

    # Long polls hold the connection for up to 20 s: the read timeout must exceed that.
    config = Config(read_timeout=30, connect_timeout=5, retries={"max_attempts": 5, "mode": "standard"})
    return boto3.client("sqs", region_name=region, endpoint_url=endpoint_url, config=config)
