"""Terminal results: to the result queue and, signed, to the job's webhook.

Webhook signatures follow Standard Webhooks (the ``standardwebhooks`` package): the signed
content is ``{webhook-id}.{webhook-timestamp}.{body}``, so a captured delivery cannot be replayed
later (receivers reject stale timestamps) or twice (they remember ids), and every language has a
ready verifier. The id is fixed per delivery: the transfer client's retries resend it unchanged.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Protocol

from standardwebhooks import Webhook

from handlers.errors import JobError
from worker.contract import JobResult
from worker.queue import ResultSink
from worker.urls import redact_url

log = logging.getLogger(__name__)

# Standard Webhooks' own secret format: "whsec_" + base64 of the key bytes.
SECRET_PREFIX = "whsec_"


class WebhookPoster(Protocol):
    def post_json(self, url: str, body: bytes, headers: dict[str, str]) -> None: ...


def signing_key(secret: str) -> bytes | str:
    """A ``whsec_...`` secret as Standard Webhooks defines it; any other text as its UTF-8 bytes."""
    return secret if secret.startswith(SECRET_PREFIX) else secret.encode()


def signature_headers(body: bytes, secret: str, *, msg_id: str, at: datetime) -> dict[str, str]:
    """The ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers for ``body``."""
    signature = Webhook(signing_key(secret)).sign(msg_id, at, body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
    }


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
            msg_id = f"msg_{uuid.uuid4().hex}"
            headers.update(signature_headers(body, self._secret, msg_id=msg_id, at=datetime.now(UTC)))
        try:
            self._poster.post_json(url, body, headers)
        except JobError as exc:
            log.error("webhook delivery failed for job %s to %s: %s", job_id, redact_url(url), exc.message)
