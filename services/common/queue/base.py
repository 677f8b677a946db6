"""What services need from a job queue and event bus, whatever runs it.

Jobs: `enqueue` puts a payload on a named queue; a worker `claim`s it (at most one worker holds a
job at a time), `touch`es it while working on it, and `ack`s it when done. A job whose worker died
(no ack and no touch for the visibility timeout) is handed to the next `claim`, with its
`deliveries` count raised, so no job is lost with its worker. A worker asked to stop `release`s
its job instead: the next `claim` gets it at once, and a shutdown is not counted as a failure.

A job whose stored payload cannot be read (not a JSON object: a damaged entry, a hand edit, a
writer of another version) can never be handled, whoever claims it: `claim` dead-letters it on
sight and goes on to the next job, instead of handing it out for ever ahead of valid ones.

Events: `publish` appends an event to a named channel; `read` returns the events after a cursor
and waits for new ones, so a late subscriber replays a run's whole history, then follows it.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backpropagate_api.settings import Settings

log = logging.getLogger(__name__)

JsonDict = dict[str, Any]
# Both implementations keep only this many of a channel's newest events: a late reader replays a
# run's history, but a long-lived channel must not grow without bound.
EVENTS_KEPT_PER_CHANNEL = 10_000
# And a channel without a new event for this long goes whole (QueueSettings.events_ttl_seconds):
# the record of a job outlives its events, and a stack that ran many jobs holds only recent ones.
EVENTS_TTL_SECONDS = 7 * 24 * 3600.0


# How much of an unreadable payload a dead letter's reason quotes, for an operator to recognise it.
QUOTED_CHARACTERS = 200


class UnreadablePayload(ValueError):
    """A job's stored payload is not a JSON object; the message, the dead letter's reason, says
    what is wrong with it."""


def parse_payload(text: str | None) -> JsonDict:
    """The payload of a job as stored (None: the entry has none); UnreadablePayload if it is not
    a JSON object."""
    if text is None:
        raise UnreadablePayload("unreadable: the entry has no payload")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise UnreadablePayload(
            f"unreadable: the payload is not JSON ({error}): {text[:QUOTED_CHARACTERS]!r}"
        ) from error
    if not isinstance(payload, dict):
        raise UnreadablePayload(
            f"unreadable: the payload is not a JSON object: {text[:QUOTED_CHARACTERS]!r}"
        )
    return payload


def log_unreadable(queue: str, job_id: str, reason: str) -> None:
    """Say that `claim` dead-lettered an unreadable job: no worker ever sees it to say so."""
    log.error("job %s of queue %s dead-lettered: %s", job_id, queue, reason)


def dead_letter_payload(text: str) -> JsonDict:
    """A dead letter's payload as stored; {} for an unreadable one, which its reason quotes."""
    try:
        return parse_payload(text)
    except UnreadablePayload:
        return {}


@dataclass(frozen=True)
class Job:
    job_id: str
    queue: str
    payload: JsonDict
    deliveries: int = 1


@dataclass(frozen=True)
class DeadLetter:
    """A job taken out of circulation after too many deliveries, or because its payload could
    not be read ({} here; `reason` quotes it), kept for an operator."""

    job_id: str
    payload: JsonDict
    deliveries: int
    reason: str


@dataclass(frozen=True)
class QueueDepth:
    """How much work a queue holds (its metrics): jobs waiting for a worker (a released job
    waits again), jobs a worker holds, jobs dead-lettered."""

    waiting: int
    pending: int
    dead_letters: int


@dataclass(frozen=True)
class Event:
    event_id: str  # the cursor to pass to `read` to get the events after this one
    data: JsonDict = field(default_factory=dict)


class JobQueue(ABC):
    @abstractmethod
    def enqueue(self, queue: str, payload: JsonDict) -> str:
        """Append a job; returns its id."""

    @abstractmethod
    def claim(self, queue: str, consumer: str, timeout: float) -> Job | None:
        """Take the next job: a dead worker's expired job first, else a new one.

        Waits up to `timeout` seconds; None when there is nothing to do. A job whose payload
        cannot be read is dead-lettered on the way, never returned.
        """

    @abstractmethod
    def touch(self, job: Job, consumer: str) -> bool:
        """Tell the queue the job is still being worked on (resets its visibility timeout).

        False when `consumer` no longer holds it (acked, dead-lettered, released, or redelivered
        to another worker after the timeout): the worker should stop, its work is someone else's.
        """

    @abstractmethod
    def release(self, job: Job, consumer: str) -> bool:
        """Give the job back unfinished, for a worker asked to stop (its progress saved).

        The next `claim` by any consumer gets it at once, with the same `deliveries`: a graceful
        stop is not a crash, so it does not bring the job closer to `max_attempts`. Owner-checked
        like `ack`.
        """

    @abstractmethod
    def ack(self, job: Job, consumer: str) -> bool:
        """The job is done (its outcome is recorded): never deliver it again.

        Only its holder can: a worker that lost the job (it stalled past the timeout and the job
        went to another worker) acks nothing and gets False.
        """

    @abstractmethod
    def dead_letter(self, job: Job, consumer: str, reason: str) -> bool:
        """Take a job that keeps failing out of circulation: ack it and keep it, with `reason`,
        on the queue's dead-letter list. Owner-checked like `ack`."""

    @abstractmethod
    def dead_letters(self, queue: str) -> list[DeadLetter]:
        """The queue's dead-lettered jobs, oldest first."""

    @abstractmethod
    def pending_count(self, queue: str) -> int:
        """Jobs claimed but not acked yet (a released job waits again: it is not counted)."""

    @abstractmethod
    def depth(self, queue: str) -> QueueDepth:
        """The queue's waiting, pending and dead-lettered jobs now."""

    @abstractmethod
    def is_pending(self, queue: str, job_id: str) -> bool:
        """Whether the job is still to be done: enqueued, and neither acked nor dead-lettered."""

    @abstractmethod
    def publish(self, channel: str, data: JsonDict) -> str:
        """Append an event; returns its id."""

    @abstractmethod
    def read(self, channel: str, after: str, timeout: float) -> list[Event]:
        """Events after the cursor `after` ("" = from the first), oldest first.

        Returns at once when there are some, else waits up to `timeout` seconds for one.
        """

    @abstractmethod
    def is_event_id(self, text: str) -> bool:
        """Whether `text` has the form of the ids `publish` returns: the only cursors `read`
        takes. A caller's cursor (a watch's after_event_id) is checked with it first."""

    def close(self) -> None:  # noqa: B027  # optional for implementations holding nothing
        """Release connections."""


def make_queue(settings: Settings) -> JobQueue:
    """The queue the settings ask for."""
    if settings.queue.backend == "redis":
        from backpropagate_services.common.queue.redis_streams import RedisStreamsQueue

        return RedisStreamsQueue(
            settings.queue.redis_url,
            namespace=settings.queue.namespace,
            visibility_timeout=settings.queue.visibility_timeout_seconds,
            events_ttl=settings.queue.events_ttl_seconds,
        )
    from backpropagate_services.common.queue.embedded import EmbeddedQueue

    return EmbeddedQueue(
        visibility_timeout=settings.queue.visibility_timeout_seconds,
        path=settings.queue.embedded_path or settings.home / "queue.sqlite3",
        events_ttl=settings.queue.events_ttl_seconds,
    )
