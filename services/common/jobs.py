"""A worker that claims jobs from one queue, keeps them alive while working, and acks them.

Trainer and export workers differ only in `handle`; claiming, heartbeats (the lease), acking and
releasing live here once. A job is acked once its outcome is durably recorded. A worker that dies
mid-job leaves it un-acked, and the queue hands it to another worker after the visibility
timeout; one asked to shut down releases it at once; one that finds its lease taken by another
worker stops without writing anything.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from google.protobuf.message import Message
from tenacity import (
    before_sleep_log,
    retry,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from backpropagate_api.errors import (
    BackpropagateError,
    DependencyError,
    JobAttemptsExhaustedError,
    JobCancelledError,
    QueueUnavailableError,
    StoreUnavailableError,
    UserError,
)
from backpropagate_api.grpc_errors import as_backpropagate_error, error_to_detail
from backpropagate_api.layout import EXPORT_QUEUE, TRAIN_QUEUE, cancel_channel
from backpropagate_api.statuses import TERMINAL_STATUSES
from backpropagate_api.tracing import TRACEPARENT, current_traceparent, span
from backpropagate_api.v1 import common_pb2, export_pb2, trainer_pb2
from backpropagate_services.common.metrics import (
    JOB_REDELIVERIES,
    JOBS_RUNNING,
    count_job_end,
)
from backpropagate_services.common.queue import Job, JobQueue
from backpropagate_services.common.records import publish, save_record
from backpropagate_services.common.service import BackgroundWorker
from backpropagate_services.common.store.base import ArtifactStore

log = logging.getLogger(__name__)

CLAIM_TIMEOUT_SECONDS = 1.0

# Store calls whose failure would lose an outcome ride out an outage of about half a minute
# (a restarting MinIO, a Redis failover) before the job is left to be delivered again. Each wait
# is logged: a worker that seems stuck says what it waits for.
durably = retry(
    retry=retry_if_exception_type(DependencyError),
    stop=stop_after_delay(30),
    wait=wait_exponential(multiplier=0.5, max=5),
    before_sleep=before_sleep_log(log, logging.WARNING),
    reraise=True,
)


def consumer_name(role: str) -> str:
    """Unique per process and thread, readable in `XINFO CONSUMERS`."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"


class JobInterrupted(Exception):
    """The worker gives the job up without an outcome: nothing is recorded, nothing acked."""


class LeaseLost(JobInterrupted):
    """Another worker holds the job now (this one stalled past the visibility timeout)."""


class ReleasedForShutdown(JobInterrupted):
    """The worker is shutting down: the job was checkpointed and goes back to the queue."""


class InfrastructureAway(JobInterrupted):
    """The queue or the store stayed away past the retry window. No outcome is recorded (it
    could not be saved anyway): the job is delivered again once they are back, and a run goes
    on from its last checkpoint, instead of failing for an outage."""


class StoppedForLater(Exception):
    """The job stopped on purpose after a checkpoint and waits to be resumed: its outcome is
    INTERRUPTED (recorded, acked, taken by no worker until resumed)."""


class Lease:
    """This worker's hold on a job: renewed by the heartbeat, confirmed before every write.

    A refused renewal means another worker took the job over; from then on this one must not
    write a record, a checkpoint or an artifact, or it would overwrite the new holder's work.
    """

    def __init__(self, queue: JobQueue, job: Job, consumer: str) -> None:
        self.queue = queue
        self.job = job
        self.consumer = consumer
        self.lost = threading.Event()

    def renew(self) -> bool:
        """Touch the job; False (and lost for good) when another worker holds it."""
        if self.lost.is_set():
            return False
        held = self.queue.touch(self.job, self.consumer)
        if not held:
            # Logged from the heartbeat thread, outside the run's log context: name the run.
            log.warning(
                "lost the lease on job %s (%s) to another worker", self.job.job_id, self.job.payload
            )
            self.lost.set()
        return held

    def check(self) -> None:
        """LeaseLost if the heartbeat found the job taken (cheap: no queue call)."""
        if self.lost.is_set():
            raise LeaseLost(f"Job {self.job.job_id} is held by another worker now.")

    def confirm(self) -> None:
        """Renew now, through a queue outage; LeaseLost if the job is no longer ours."""
        if not durably(self.renew)():
            raise LeaseLost(f"Job {self.job.job_id} is held by another worker now.")


@contextmanager
def kept_alive(queue: JobQueue, job: Job, consumer: str, interval: float) -> Iterator[Lease]:
    """Renew the job's lease every `interval` seconds while the body runs, so it is not
    redelivered; a failed renewal (queue away) is retried at the next beat."""
    done = threading.Event()
    lease = Lease(queue, job, consumer)

    def beat() -> None:
        while not done.wait(interval) and not lease.lost.is_set():
            try:
                lease.renew()
            except Exception:
                log.warning("heartbeat for job %s failed", job.job_id, exc_info=True)

    thread = threading.Thread(target=beat, name=f"heartbeat-{job.job_id}", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        done.set()
        thread.join(interval)


JobRecord = trainer_pb2.RunRecord | export_pb2.ExportResult


def request_cancel(queue: JobQueue, job_id: str, status: int, what: str) -> bool:
    """Ask the worker holding `job_id` to stop; True when the job is still queued, so the
    caller marks its record cancelled itself. UserError for a job that has already ended.

    The worker checks the cancel channel as it goes; publishing it for a queued job too stops
    a worker that claims the job while the caller marks it cancelled.
    """
    if status not in (common_pb2.JOB_STATUS_QUEUED, common_pb2.JOB_STATUS_RUNNING):
        raise UserError(
            f"{what} {job_id} has already ended ({common_pb2.JobStatus.Name(status)}).",  # type: ignore[arg-type]
            hint="Only queued or running jobs can be cancelled.",
            job_id=job_id,
        )
    queue.publish(cancel_channel(job_id), {"requested_at": time.time()})
    return status == common_pb2.JOB_STATUS_QUEUED


def cancel_job(
    queue: JobQueue,
    store: ArtifactStore,
    record: JobRecord,
    key: str,
    events: str,
    cancelled_event: Callable[[], Message],
) -> None:
    """CancelRun / CancelExport: signal the worker, and mark a still-queued job cancelled here
    (record saved at `key`, `cancelled_event()` published on `events`)."""
    job_id = record.run_id if isinstance(record, trainer_pb2.RunRecord) else record.export_id
    what = "Run" if isinstance(record, trainer_pb2.RunRecord) else "Export"
    if request_cancel(queue, job_id, record.status, what):
        record.status = common_pb2.JOB_STATUS_CANCELLED
        save_record(store, key, record)
        publish(queue, events, cancelled_event())


def cancel_requested(queue: JobQueue, job_id: str) -> Callable[[], bool]:
    """What a worker polls to learn that `job_id` was cancelled."""
    return lambda: bool(queue.read(cancel_channel(job_id), "", 0))


def run_recorded(record: JobRecord, work: Callable[[], str]) -> str:
    """Run `work` and write its outcome into the record: status, error detail and duration.

    Returns the line to log and publish. Every failure ends up in the record, never lost with
    the worker thread: the user reads it from GetRun / GetExport and the final event.
    """
    started = time.monotonic()
    try:
        message = work()
        record.status = common_pb2.JOB_STATUS_SUCCEEDED
    except JobInterrupted:
        raise  # no outcome: the job stays with the queue
    except (QueueUnavailableError, StoreUnavailableError) as exc:
        raise InfrastructureAway(str(exc)) from exc
    except StoppedForLater as stopped:
        record.status = common_pb2.JOB_STATUS_INTERRUPTED
        message = f"interrupted: {stopped}"
    except JobCancelledError:
        record.status = common_pb2.JOB_STATUS_CANCELLED
        message = "cancelled"
    except Exception as exc:
        record.status = common_pb2.JOB_STATUS_FAILED
        record.error.CopyFrom(error_to_detail(as_backpropagate_error(exc)))
        message = f"failed: {record.error.message}"
    record.duration_seconds = time.monotonic() - started
    count_job_end(_queue_of(record), record.status)
    succeeded = record.status == common_pb2.JOB_STATUS_SUCCEEDED
    log.log(logging.INFO if succeeded else logging.WARNING, "%s", message)
    return message


def fail_record(record: JobRecord, error: BackpropagateError) -> None:
    """Mark the record failed with `error`, as `run_recorded` would have."""
    record.status = common_pb2.JOB_STATUS_FAILED
    record.error.CopyFrom(error_to_detail(error))
    count_job_end(_queue_of(record), record.status)


def _queue_of(record: JobRecord) -> str:
    return TRAIN_QUEUE if isinstance(record, trainer_pb2.RunRecord) else EXPORT_QUEUE


def job_payload(**fields: str) -> dict[str, str]:
    """A job's payload: `fields`, and the trace of the call that queues it, which the worker
    that claims it goes on (`job_span`)."""
    traceparent = current_traceparent()
    return {**fields, TRACEPARENT: traceparent} if traceparent else fields


@contextmanager
def job_span(job: Job) -> Iterator[None]:
    """The span of a job's handling, in the trace of the call that queued it."""
    with span(
        f"{job.queue} job",
        parent=str(job.payload.get(TRACEPARENT, "")),
        **{"messaging.message.id": job.job_id, "backpropagate.job.deliveries": job.deliveries},
    ):
        yield


class JobWorker(BackgroundWorker):
    """Claims jobs and acknowledges each only once its outcome is durably recorded.

    `handle` returns after saving the job's terminal record (or finding it already ended: a
    redelivered job is then acked without running again). If it raises, the job is not acked
    and the queue delivers it again after the visibility timeout, so a store outage loses
    nothing. A job delivered more than `max_attempts` times (it killed every worker that took
    it) is recorded as failed with RUNTIME_JOB_ATTEMPTS_EXHAUSTED and dead-lettered.
    """

    queue_name: str

    def __init__(self, queue: JobQueue, visibility_timeout: float, max_attempts: int) -> None:
        super().__init__()
        self.queue = queue
        self.heartbeat_interval = max(visibility_timeout / 3, 0.1)
        self.max_attempts = max_attempts
        self.consumer = ""
        self.lease: Lease | None = None  # of the job being handled
        self._idle_since: float | None = time.monotonic()  # None while handling a job
        # Series from the start, at 0: a rate over a counter that appears late misses its start.
        JOB_REDELIVERIES.labels(self.queue_name)
        JOBS_RUNNING.labels(self.queue_name)

    def idle_seconds(self) -> float:
        """How long this worker has had no job (0 while it has one)."""
        since = self._idle_since
        return 0.0 if since is None else time.monotonic() - since

    @abstractmethod
    def handle(self, job: Job) -> None:
        """Do the job and save its terminal record; raise to have it delivered again."""

    @abstractmethod
    def job_record(self, job: Job) -> JobRecord:
        """The job's record, read from the store (retried through outages)."""

    @abstractmethod
    def finish(self, record: JobRecord, message: str) -> None:
        """Save the terminal record (retried through outages) and publish its last event."""

    def give_up(self, job: Job, error: JobAttemptsExhaustedError) -> None:
        """Save the job's record as failed with `error`, unless it has ended already."""
        record = self.job_record(job)
        if record.status not in TERMINAL_STATUSES:
            fail_record(record, error)
            self.finish(record, f"failed: {error.message}")

    def run_once(self) -> None:
        if not self.consumer:  # named in the worker's own thread
            self.consumer = consumer_name(self.name)
        job = self.queue.claim(self.queue_name, self.consumer, CLAIM_TIMEOUT_SECONDS)
        if job is not None:
            self.run_claimed(job)

    def run_claimed(self, job: Job) -> None:
        """Handle a job this worker claimed, holding its lease; then ack it, release it (a
        shutdown) or leave it to be delivered again (no outcome recorded)."""
        if job.deliveries > 1:
            JOB_REDELIVERIES.labels(self.queue_name).inc()
        if job.deliveries > self.max_attempts:
            reason = (
                f"delivered {job.deliveries} times; every worker that took it died before "
                "recording an outcome"
            )
            log.error("job %s dead-lettered: %s", job.job_id, reason)
            try:
                self.give_up(
                    job, JobAttemptsExhaustedError(f"The job was {reason}.", job=job.job_id)
                )
            finally:  # even a job whose record cannot be read must leave the queue
                self.queue.dead_letter(job, self.consumer, reason)
            return
        self._idle_since = None
        running = JOBS_RUNNING.labels(self.queue_name)
        running.inc()
        try:
            with (
                job_span(job),
                kept_alive(self.queue, job, self.consumer, self.heartbeat_interval) as lease,
            ):
                self.lease = lease
                self.handle(job)
        except ReleasedForShutdown:
            released = self.queue.release(job, self.consumer)
            log.info("job %s released for another worker (%s)", job.job_id, released)
            return
        except LeaseLost:
            log.warning("job %s: stopped without writing; its new holder goes on", job.job_id)
            return
        except JobInterrupted as left:  # the queue or store away, a process of the attempt lost
            log.warning("job %s left to be delivered again: %s", job.job_id, left)
            return
        finally:
            running.dec()
            self.lease = None
            self._idle_since = time.monotonic()
        if not self.queue.ack(job, self.consumer):
            log.warning("job %s went to another worker meanwhile; left to it", job.job_id)
