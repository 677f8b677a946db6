"""The job queue and event bus in one process's memory, for the CLI and a single-machine stack.

It keeps the Redis Streams queue's semantics exactly (the contract tests run against both), so a
service behaves the same whichever one it was given. Nothing survives the process: that is the
point of the embedded default, which needs no server.

Event history is not trimmed: it lives only as long as the process that wrote it.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from backpropagate_services.common.queue.base import DeadLetter, Event, Job, JobQueue, JsonDict


@dataclass
class _Claim:
    """A delivered, not yet acked job: who holds it and when they last showed signs of life."""

    job: Job
    consumer: str
    last_seen: float  # time.monotonic()


class EmbeddedQueue(JobQueue):
    def __init__(self, visibility_timeout: float) -> None:
        self._visibility_timeout = visibility_timeout
        # One condition for jobs and events: waiters re-check their own state when woken, and a
        # single lock keeps claim's "expired first, else new" decision atomic.
        self._changed = threading.Condition()
        self._new: defaultdict[str, deque[Job]] = defaultdict(deque)
        self._claimed: defaultdict[str, dict[str, _Claim]] = defaultdict(dict)
        self._events: defaultdict[str, list[Event]] = defaultdict(list)
        self._dead: defaultdict[str, list[DeadLetter]] = defaultdict(list)
        self._ids = itertools.count(1)

    def _next_id(self) -> str:
        # Zero-padded so that string order is creation order, as cursors compare as strings.
        return f"{next(self._ids):020d}"

    def enqueue(self, queue: str, payload: JsonDict) -> str:
        with self._changed:
            job = Job(job_id=self._next_id(), queue=queue, payload=payload)
            self._new[queue].append(job)
            self._changed.notify_all()
            return job.job_id

    def claim(self, queue: str, consumer: str, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                now = time.monotonic()
                job = self._take_expired(queue, now) or self._take_new(queue)
                if job is not None:
                    self._claimed[queue][job.job_id] = _Claim(job, consumer, now)
                    return job
                if now >= deadline:
                    return None
                # Nobody notifies when a claim expires, so wake up for the earliest expiry too.
                self._changed.wait(min(deadline, self._next_expiry(queue)) - now)

    def _take_expired(self, queue: str, now: float) -> Job | None:
        for claim in self._claimed[queue].values():
            if now - claim.last_seen >= self._visibility_timeout:
                job = claim.job
                return Job(job.job_id, job.queue, job.payload, deliveries=job.deliveries + 1)
        return None

    def _take_new(self, queue: str) -> Job | None:
        pending = self._new[queue]
        return pending.popleft() if pending else None

    def _next_expiry(self, queue: str) -> float:
        return min(
            (claim.last_seen + self._visibility_timeout for claim in self._claimed[queue].values()),
            default=float("inf"),
        )

    def touch(self, job: Job, consumer: str) -> None:
        """Reset the job's visibility timeout, if `consumer` still holds it.

        A worker whose job was redelivered to another one (it stalled past the timeout) must not
        take it back, so its touch does nothing.
        """
        with self._changed:
            claim = self._claimed[job.queue].get(job.job_id)
            if claim is not None and claim.consumer == consumer:
                claim.last_seen = time.monotonic()

    def _release(self, job: Job, consumer: str) -> bool:
        """Drop the job if `consumer` holds it; the caller holds the lock."""
        claim = self._claimed[job.queue].get(job.job_id)
        if claim is None or claim.consumer != consumer:
            return False
        del self._claimed[job.queue][job.job_id]
        return True

    def ack(self, job: Job, consumer: str) -> bool:
        with self._changed:
            return self._release(job, consumer)

    def dead_letter(self, job: Job, consumer: str, reason: str) -> bool:
        with self._changed:
            if not self._release(job, consumer):
                return False
            letter = DeadLetter(job.job_id, job.payload, job.deliveries, reason)
            self._dead[job.queue].append(letter)
            return True

    def dead_letters(self, queue: str) -> list[DeadLetter]:
        with self._changed:
            return list(self._dead[queue])

    def pending_count(self, queue: str) -> int:
        with self._changed:
            return len(self._claimed[queue])

    def publish(self, channel: str, data: JsonDict) -> str:
        with self._changed:
            event = Event(event_id=self._next_id(), data=data)
            self._events[channel].append(event)
            self._changed.notify_all()
            return event.event_id

    def read(self, channel: str, after: str, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                events = self._events[channel]
                start = bisect.bisect_right(events, after, key=lambda event: event.event_id)
                remaining = deadline - time.monotonic()
                if start < len(events) or remaining <= 0:
                    return events[start:]
                self._changed.wait(remaining)
