"""The consumer loop: receive -> parse -> handler -> publish -> delete, and the graceful drain.

Acknowledgement is decided in one place (dramatiq's ``post_process_message``): ``_process``
computes an ``Outcome`` and its ``finally`` either deletes the message or releases it with a
backoff. Handlers only return or raise; ``JobError.retryable`` carries the retry decision.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from handlers.dispatch import Engines
from handlers.errors import JobError
from handlers.schemas import Limits
from worker.contract import Job, JobResult, parse_job, peek_identity, utc_now
from worker.heartbeat import Heartbeat
from worker.queue import JobSource, Message
from worker.results import ResultPublisher

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


class Runner:
    def __init__(
        self,
        *,
        source: JobSource,
        publisher: ResultPublisher,
        handlers: Mapping[str, Callable[..., Any]],
        engines: Engines,
        transfer: Any,
        limits: Limits,
        worker_id: str,
        max_attempts: int = 3,
        visibility_timeout: int = 120,
        retry_backoff_seconds: int = 10,
        wait_time_seconds: int = 20,
        shutdown_grace_seconds: float = 25.0,
        idle_shutdown_seconds: float = 0.0,
        on_idle_exit: Callable[[], None] | None = None,
        on_abandon: Callable[[], None] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self._source = source
        self._publisher = publisher
        self._handlers = handlers
        self._engines = engines
        self._transfer = transfer
        self._limits = limits
        self._worker_id = worker_id
        self._max_attempts = max_attempts
        self._retry_backoff = retry_backoff_seconds
        self._wait = wait_time_seconds
        self._grace = shutdown_grace_seconds
        self._idle_limit = idle_shutdown_seconds
        self._on_idle_exit = on_idle_exit
        self._on_abandon = on_abandon or _exit_now
        self._on_event = on_event
        self._heartbeat = Heartbeat(source=source, visibility_timeout=visibility_timeout)
        self._stopping = threading.Event()
        self._grace_timer: threading.Timer | None = None
        self.processed = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self, *, burst: bool = False) -> int:
        """Poll until stopped (``burst``: until the queue looks empty). Returns the jobs finished."""
        self._heartbeat.start()
        last_activity = time.monotonic()
        try:
            while not self._stopping.is_set():
                messages = self._source.receive(max_messages=1, wait_seconds=self._wait)
                for message in messages:
                    if self._stopping.is_set():
                        self._source.release(message, 0)  # received after SIGTERM: hand it straight back
                        continue
                    self._process(message)
                    last_activity = time.monotonic()
                if not messages and burst:
                    break
                if not messages and self._idle_expired(last_activity):
                    log.info("idle for %.0f s: shutting down", self._idle_limit)
                    if self._on_idle_exit is not None:
                        self._on_idle_exit()
                    break
        finally:
            self._heartbeat.stop()
            if self._grace_timer is not None:
                self._grace_timer.cancel()
        return self.processed

    def request_stop(self) -> None:
        """SIGTERM: stop receiving, let the job in hand finish within the grace period."""
        if self._stopping.is_set():
            return
        log.info("stop requested: draining (grace %.0f s)", self._grace)
        self._stopping.set()
        self._grace_timer = threading.Timer(self._grace, self._abandon)
        self._grace_timer.daemon = True
        self._grace_timer.start()

    def _abandon(self) -> None:
        """Grace expired: make the unfinished messages visible again at once, then exit."""
        for message in self._heartbeat.held():
            try:
                self._source.release(message, 0)
                log.warning("grace expired: released message %s for another worker", message.message_id)
            except Exception:  # best effort; the visibility timeout is the backstop
                log.exception("could not release message %s", message.message_id)
        self._on_abandon()

    def _idle_expired(self, last_activity: float) -> bool:
        return self._idle_limit > 0 and time.monotonic() - last_activity >= self._idle_limit

    # -- one message -------------------------------------------------------------------------

    def _process(self, message: Message) -> None:
        self._heartbeat.track(message)
        received_at = utc_now()
        started = time.perf_counter()
        outcome = Outcome(delete=False, delay=self._backoff(message.receive_count))
        try:
            outcome = self._run(message, received_at)
            if outcome.result is not None:
                self._publisher.publish(outcome.result, outcome.webhook_url)
        except Exception:  # loop boundary: log it, keep the message, keep the worker
            log.exception("result publishing failed for message %s; will retry", message.message_id)
            outcome = Outcome(delete=False, delay=self._backoff(message.receive_count))
        finally:
            self._heartbeat.untrack(message)
            self._settle(message, outcome, started)

    def _run(self, message: Message, received_at: str) -> Outcome:
        attempt = message.receive_count
        job: Job | None = None
        try:
            job = parse_job(message.body, self._limits)
            self._event("started", job.id, job.type, attempt)
            output = self._handlers[job.type](job.input, engines=self._engines, transfer=self._transfer)
        except JobError as exc:
            return self._failure(message, job, exc, received_at)
        except Exception as exc:  # loop boundary: an unexpected error is `internal`, retried
            log.exception("job raised unexpectedly (message %s)", message.message_id)
            error = JobError(f"{type(exc).__name__}: {exc}", code="internal", retryable=True)
            return self._failure(message, job, error, received_at)
        status = "partial" if any(not r.success for r in getattr(output, "results", [])) else "succeeded"
        result = self._result(job.id, job.type, status, attempt, received_at, output=output.model_dump())
        return Outcome(delete=True, result=result, webhook_url=job.webhook_url)

    def _failure(self, message: Message, job: Job | None, exc: JobError, received_at: str) -> Outcome:
        attempt = message.receive_count
        if exc.retryable and attempt < self._max_attempts:
            return Outcome(
                delete=False,
                delay=self._backoff(attempt),
                log_fields={"id": job.id if job else None, "error_code": exc.code, "error": exc.message},
            )
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
        # An invalid body may still carry a usable webhook; send the error there only if it parsed.
        return Outcome(delete=True, result=result, webhook_url=webhook if job is not None else None)

    def _settle(self, message: Message, outcome: Outcome, started: float) -> None:
        fields = {
            "id": outcome.result.id if outcome.result else outcome.log_fields.get("id"),
            "type": outcome.result.type if outcome.result else None,
            "attempt": message.receive_count,
            "message_id": message.message_id,
            "duration_ms": int((time.perf_counter() - started) * 1000),
            **{k: v for k, v in outcome.log_fields.items() if k != "id"},
        }
        if outcome.delete:
            self._source.delete(message)
            self.processed += 1
            status = outcome.result.status if outcome.result else "deleted"
            if outcome.result is not None and outcome.result.error:
                fields["error_code"] = outcome.result.error["code"]
                fields["error"] = outcome.result.error["message"]
        else:
            self._source.release(message, outcome.delay)
            status = "retry"
            fields["retry_in_s"] = outcome.delay
        fields["status"] = status
        log.info("job %s", status, extra={"job": fields})
        if self._on_event is not None:
            self._on_event(status, fields)

    # -- helpers -----------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> int:
        return min(MAX_BACKOFF_SECONDS, self._retry_backoff * 2 ** max(0, attempt - 1))

    def _event(self, status: str, job_id: str, job_type: str, attempt: int) -> None:
        fields = {"id": job_id, "type": job_type, "attempt": attempt, "status": status}
        log.info("job %s", status, extra={"job": fields})

    def _result(
        self, job_id: str, job_type: str | None, status: str, attempt: int, received_at: str, **kw: Any
    ) -> JobResult:
        return JobResult(
            id=job_id,
            type=job_type,
            status=status,  # type: ignore[arg-type]
            attempt=attempt,
            worker_id=self._worker_id,
            model=self._engines.model_name,
            received_at=received_at,
            finished_at=utc_now(),
            **kw,
        )


def _exit_now() -> None:
    logging.shutdown()
    os._exit(0)
