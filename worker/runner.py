"""The consumer loop: receive -> execute -> publish -> delete, with bounded concurrency and a drain.

Acknowledgement is decided in one place (dramatiq's ``post_process_message``): ``_process``
gets an ``Outcome`` from the executor and its ``finally`` either deletes the message or
releases it with a backoff. Handlers only return or raise.

Up to ``concurrency`` jobs are in hand at once. The engines serialise GPU work with their own
lock, so a second job is not a second model run: it is job N+1's download and inference
overlapping job N's encoding, upload and result, so the GPU does not wait on I/O.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from worker.execute import JobExecutor, Outcome, event_fields
from worker.heartbeat import Heartbeat
from worker.poll_health import PollHealth
from worker.queue import JobSource, Message
from worker.results import ResultPublisher

log = logging.getLogger(__name__)

QUEUE_ERROR_PAUSE_MAX = 30  # seconds between receive attempts while the queue is unreachable


class Runner:
    def __init__(
        self,
        *,
        source: JobSource,
        publisher: ResultPublisher,
        executor: JobExecutor,
        concurrency: int = 2,
        visibility_timeout: int = 120,
        wait_time_seconds: int = 20,
        shutdown_grace_seconds: float = 25.0,
        idle_shutdown_seconds: float = 0.0,
        on_idle_exit: Callable[[], object] | None = None,
        on_abandon: Callable[[], None] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        polls: PollHealth | None = None,
    ) -> None:
        self._source = source
        self._publisher = publisher
        self._executor = executor
        self._concurrency = concurrency
        self._wait = wait_time_seconds
        self._grace = shutdown_grace_seconds
        self._idle_limit = idle_shutdown_seconds
        self._on_idle_exit = on_idle_exit
        self._on_abandon = on_abandon or _exit_now
        self._on_event = on_event
        self._polls = polls or PollHealth()
        self._heartbeat = Heartbeat(source=source, visibility_timeout=visibility_timeout)
        self._stopping = threading.Event()
        self._grace_timer: threading.Timer | None = None
        self._in_hand = 0
        self._releases = 0  # messages handed back for a retry (burst mode polls again after one)
        self._changed = threading.Condition()
        self._last_activity = time.monotonic()
        self.processed = 0

    @property
    def concurrency(self) -> int:
        """Jobs in hand at most."""
        return self._concurrency

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self, *, burst: bool = False) -> int:
        """Poll until stopped (``burst``: until the queue is empty and nothing is in hand).

        Returns the number of jobs finished (messages deleted).
        """
        self._heartbeat.start()
        pool = ThreadPoolExecutor(max_workers=self._concurrency, thread_name_prefix="job")
        try:
            while not self._stopping.is_set():
                self._wait_for_slot()
                if self._stopping.is_set():
                    break
                releases_before = self._releases
                messages = self._poll()
                if messages is None:
                    continue
                for message in messages:
                    self._start(pool, message)
                if not messages and self._should_end(burst, releases_before):
                    break
        finally:
            pool.shutdown(wait=True)  # the jobs in hand finish; the grace timer bounds this on SIGTERM
            self._heartbeat.stop()
            if self._grace_timer is not None:
                self._grace_timer.cancel()
        return self.processed

    def _start(self, pool: ThreadPoolExecutor, message: Message) -> None:
        if self._stopping.is_set():
            self._source.release(message, 0)  # received after SIGTERM: hand it straight back
            return
        with self._changed:
            self._in_hand += 1
        self._heartbeat.track(message)
        pool.submit(self._process, message)

    def _wait_for_slot(self) -> None:
        with self._changed:
            while self._in_hand >= self._concurrency and not self._stopping.is_set():
                self._changed.wait(0.5)

    def _should_end(self, burst: bool, releases_before: int) -> bool:
        """After an empty poll: burst mode ends once nothing is in hand and nothing came back for a
        retry since the poll; otherwise the idle limit decides."""
        with self._changed:
            if burst:
                while self._in_hand:
                    self._changed.wait(0.5)
                return self._releases == releases_before
            idle = self._in_hand == 0 and self._idle_limit > 0
        if idle and time.monotonic() - self._last_activity >= self._idle_limit:
            log.info("idle for %.0f s: shutting down", self._idle_limit)
            if self._on_idle_exit is not None:
                self._on_idle_exit()
            return True
        return False

    def _poll(self) -> list[Message] | None:
        """One long poll; None when the queue could not be reached (logged, retried after a pause)."""
        try:
            messages = self._source.receive(max_messages=1, wait_seconds=self._wait)
        except Exception as exc:  # loop boundary: a queue outage must not end the worker
            failures = self._polls.failed()
            pause = min(QUEUE_ERROR_PAUSE_MAX, 2 ** min(failures, 5))
            # The traceback once per outage; after that one line per retry (an outage can last
            # hours, and a botocore traceback is ~5 KB).
            log.warning(
                "receive failed (%d in a row): %s; retrying in %d s",
                failures,
                exc,
                pause,
                exc_info=failures == 1,
            )
            self._stopping.wait(pause)
            return None
        self._polls.succeeded()
        return messages

    def request_stop(self) -> None:
        """SIGTERM: stop receiving, let the jobs in hand finish within the grace period."""
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

    # -- one message -------------------------------------------------------------------------

    def _process(self, message: Message) -> None:
        started = time.perf_counter()
        outcome = Outcome(delete=False, delay=self._executor.backoff(message.receive_count))
        try:
            outcome = self._executor.execute(message)
            if outcome.result is not None:
                self._publisher.publish(outcome.result, outcome.webhook_url)
        except Exception:  # loop boundary: log it, keep the message, keep the worker
            log.exception("result publishing failed for message %s; will retry", message.message_id)
            # Keep what the job was (id, type, its fields): SPEC puts the id on every line of a job.
            outcome = dataclasses.replace(
                outcome, delete=False, delay=self._executor.backoff(message.receive_count)
            )
        finally:
            self._heartbeat.untrack(message)
            self._settle(message, outcome, started)
            with self._changed:
                self._in_hand -= 1
                self._last_activity = time.monotonic()
                self._changed.notify_all()

    def _settle(self, message: Message, outcome: Outcome, started: float) -> None:
        fields = event_fields(message, outcome, started)
        status: str
        try:
            if outcome.delete:
                self._source.delete(message)
                self.processed += 1
                status = outcome.result.status if outcome.result else "deleted"
            else:
                self._source.release(message, outcome.delay)
                self._releases += 1
                status = "retry"
                fields["retry_in_s"] = outcome.delay
        except Exception:  # loop boundary: the message reappears after its visibility timeout
            log.exception("could not settle message %s; it will be redelivered", message.message_id)
            status = "unsettled"
        fields["status"] = status
        log.info("job %s", status, extra={"job": fields})
        if self._on_event is not None:
            self._on_event(status, fields)


def _exit_now() -> None:
    logging.shutdown()
    os._exit(0)
