"""Terminal results: to the result queue and, signed, to the job's webhook."""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Protocol

from handlers.errors import JobError
from worker.contract import JobResult
from worker.queue import ResultSink
from worker.urls import redact_url

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Signature"


class WebhookPoster(Protocol):
    def post_json(self, url: str, body: bytes, headers: dict[str, str]) -> None: ...


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class ResultPublisher:
    """Publishes one terminal result.

    The result queue is the durable channel: a failure to send there propagates, so the
    runner keeps the message and the job is retried. A webhook that still fails after the
    transfer client's retries is logged and dropped, so one dead endpoint cannot make a
    finished job run again and again.
    """

    def __init__(self, *, sink: ResultSink | None, poster: WebhookPoster, webhook_secret: str | None) -> None:
        self._sink = sink
        self._poster = poster
        self._secret = webhook_secret

    def publish(self, result: JobResult, webhook_url: str | None) -> None:
        body = result.model_dump_json()
        if self._sink is not None:
            self._sink.send(body)
        if webhook_url:
            self._post_webhook(webhook_url, body.encode(), result.id)

    def _post_webhook(self, url: str, body: bytes, job_id: str) -> None:
        headers = {"Content-Type": "application/json"}
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(body, self._secret)
        try:
            self._poster.post_json(url, body, headers)
        except JobError as exc:
            log.error("webhook delivery failed for job %s to %s: %s", job_id, redact_url(url), exc.message)
