"""One message -> an ``Outcome``: parse, run the handler, turn errors into results or retries.

No queue calls here: the runner publishes and acknowledges in one ``finally`` from the outcome.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from handlers.dispatch import Handler
from handlers.engine_set import Engines
from handlers.errors import JobError
from handlers.ports import Transfer
from handlers.schemas import Limits
from worker.contract import Job, JobResult, Status, parse_job, peek_identity, utc_now
from worker.cost import ShareClock, cost_usd
from worker.queue import Message

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 900  # a transient failure is retried within 15 minutes at the latest


@dataclass
class Outcome:
    """What to do with a message once its job has run."""

    delete: bool
    delay: int = 0
    result: JobResult | None = None
    webhook_url: str | None = None
    log_fields: dict[str, Any] = field(default_factory=dict)
    timings: Mapping[str, int] = field(default_factory=dict)  # the handler's, for the log line


class JobExecutor:
    def __init__(
        self,
        *,
        handlers: Mapping[str, Handler[Any]],
        engines: Engines,
        transfer: Transfer,
        limits: Limits,
        worker_id: str,
        max_attempts: int = 3,
        retry_backoff_seconds: int = 10,
        price_per_hour: float | None = None,
    ) -> None:
        self._handlers = handlers
        self._engines = engines
        self._transfer = transfer
        self._limits = limits
        self._worker_id = worker_id
        self._max_attempts = max_attempts
        self._retry_backoff = retry_backoff_seconds
        self._price = price_per_hour
        self._share_clock = ShareClock()

    def backoff(self, attempt: int) -> int:
        return min(MAX_BACKOFF_SECONDS, self._retry_backoff * 2 ** max(0, attempt - 1))

    def execute(self, message: Message) -> Outcome:
        """Run the job and stamp what it cost on its result and log fields (retries cost too)."""
        mark = self._share_clock.start()
        gpu_before = self._engines.gpu.held_seconds()
        try:
            outcome = self._execute(message)
        finally:
            share = self._share_clock.stop(mark)
        costs: dict[str, Any] = {
            "queue": message.queue or None,
            "gpu_seconds": round(self._engines.gpu.held_seconds() - gpu_before, 4),
            "cost_usd": cost_usd(share, self._price),
        }
        outcome.log_fields.update(costs)
        if outcome.result is not None:
            outcome.result = outcome.result.model_copy(update=costs)
        return outcome

    def _execute(self, message: Message) -> Outcome:
        received_at = utc_now()
        attempt = message.receive_count
        job: Job | None = None
        try:
            job = parse_job(message.body, self._limits)
            fields = {"id": job.id, "type": job.type, "attempt": attempt, "status": "started"}
            log.info("job started", extra={"job": fields})
            finished = self._handlers[job.type](job.input, engines=self._engines, transfer=self._transfer)
        except JobError as exc:
            return self._failure(message, job, exc, received_at)
        except Exception as exc:  # loop boundary: an unexpected error is `internal`, retried
            log.exception("job raised unexpectedly (message %s)", message.message_id)
            error = JobError(f"{type(exc).__name__}: {exc}", code="internal", retryable=True)
            return self._failure(message, job, error, received_at)
        output = finished.output.model_dump()
        result = self._result(job.id, job.type, finished.status, attempt, received_at, output=output)
        return Outcome(delete=True, result=result, webhook_url=job.webhook_url, timings=finished.timings)

    def _failure(self, message: Message, job: Job | None, exc: JobError, received_at: str) -> Outcome:
        attempt = message.receive_count
        if exc.retryable and attempt < self._max_attempts:
            return Outcome(
                delete=False,
                delay=self.backoff(attempt),
                log_fields={"id": job.id if job else None, "error_code": exc.code, "error": exc.message},
            )
        job_id: str | None
        job_type: str | None
        webhook: str | None
        if job is not None:
            job_id, job_type, webhook = job.id, job.type, job.webhook_url
        else:
            job_id, job_type, webhook = peek_identity(message.body)
        result = self._result(
            job_id or message.message_id,
            job_type,
            "failed",
            attempt,
            received_at,
            error=exc.to_dict(),
            sqs_message_id=None if job_id else message.message_id,
        )
        # The webhook of a body that failed validation is not trusted: it may be the invalid part.
        return Outcome(delete=True, result=result, webhook_url=webhook if job is not None else None)

    def _result(
        self, job_id: str, job_type: str | None, status: Status, attempt: int, received_at: str, **kw: Any
    ) -> JobResult:
        return JobResult(
            id=job_id,
            type=job_type,
            status=status,
            attempt=attempt,
            worker_id=self._worker_id,
            model=self._engines.model_name,
            received_at=received_at,
            finished_at=utc_now(),
            **kw,
        )


def event_fields(message: Message, outcome: Outcome, started: float) -> dict[str, Any]:
    """The structured fields of a job's log line (and metrics): id, type, attempt, timings, error."""
    result = outcome.result
    fields: dict[str, Any] = {
        "id": result.id if result else outcome.log_fields.get("id"),
        "type": result.type if result else None,
        "attempt": message.receive_count,
        "message_id": message.message_id,
        "duration_ms": int((time.perf_counter() - started) * 1000),
        "queue_wait_ms": _queue_wait_ms(message),
        **{k: v for k, v in outcome.log_fields.items() if k != "id"},
    }
    if result is not None:
        fields.update(outcome.timings)
        if result.error:
            fields["error_code"] = result.error["code"]
            fields["error"] = result.error["message"]
    return fields


def _queue_wait_ms(message: Message) -> int | None:
    return None if message.sent_at is None else max(0, int((time.time() - message.sent_at) * 1000))
