"""The job queue and event bus in a SQLite file, for the CLI and a single-machine stack.

It keeps the Redis Streams queue's semantics exactly (the contract tests run against both), so a
service behaves the same whichever one it was given, and it needs no server. Every process of the
machine that opens the file (by default <home>/queue.sqlite3) shares one queue: a `backprop
train`, a detached worker, a `backprop runs watch` in another terminal. Jobs, claims, events and
dead letters outlive those processes. Without a path the database is in memory, private to the
object (tests).

A claim records its holder's process: once that process has exited, the claim expires at once
rather than after the visibility timeout, so a run whose CLI was killed can be resumed right away.
Waiters are woken at once by writes from their own process, and poll for the others'.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from backpropagate_services.common.queue.base import (
    EVENTS_KEPT_PER_CHANNEL,
    EVENTS_TTL_SECONDS,
    DeadLetter,
    Event,
    Job,
    JobQueue,
    JsonDict,
    QueueDepth,
    UnreadablePayload,
    dead_letter_payload,
    log_unreadable,
    parse_payload,
)
from backpropagate_services.common.queue.sqlite_file import MACHINE, available, connect

# How soon a waiting claim or read sees a write from another process, or a claim expire.
POLL_SECONDS = 0.1
# The job's row, only while `consumer` holds it: what every owner-checked change updates.
_HELD = "WHERE queue = ? AND id = ? AND consumer = ?"

_T = TypeVar("_T")


def _identifier(number: int) -> str:
    # Zero-padded so that string order is creation order, as cursors compare as strings.
    return f"{number:020d}"


# What `_identifier` makes of a row id, which SQLite keeps below 2^63.
_IDENTIFIER = re.compile(r"[0-9]{20}")


def _number(identifier: str) -> int:
    return int(identifier) if identifier else 0


def _held(job: Job, consumer: str) -> tuple[str, int, str]:
    return job.queue, _number(job.job_id), consumer


def _bury(db: sqlite3.Connection, queue: str, number: int, consumer: str, reason: str) -> bool:
    """Move job `number` to the dead letters if `consumer` holds it, in the caller's
    transaction; False (nothing changed) if it does not."""
    rows = db.execute(
        f"DELETE FROM jobs {_HELD} RETURNING payload, deliveries", (queue, number, consumer)
    ).fetchall()
    if not rows:
        return False
    [(payload, deliveries)] = rows
    db.execute(
        "INSERT INTO dead_letters (queue, job_id, payload, deliveries, reason) "
        "VALUES (?, ?, ?, ?, ?)",
        (queue, _identifier(number), payload, deliveries, reason),
    )
    return True


class EmbeddedQueue(JobQueue):
    def __init__(
        self,
        visibility_timeout: float,
        path: Path | None = None,
        events_ttl: float = EVENTS_TTL_SECONDS,
    ) -> None:
        self._visibility_timeout = visibility_timeout
        self._events_ttl = events_ttl
        self._where = str(path) if path is not None else ":memory:"
        # One lock guards the connection and wakes this process's waiters; `_writes` counts the
        # commits that changed something, so a waiter tells a real change from a timeout.
        self._changed = threading.Condition()
        self._writes = 0
        with available(self._where):
            self._db = connect(path)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write across processes; this process's waiters are woken if it changed
        anything (a claim that found nothing must not wake the other claimers in a loop)."""
        with self._changed, available(self._where):
            changes_before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            if self._db.total_changes != changes_before:
                self._writes += 1
                self._changed.notify_all()

    def _query(self, sql: str, *parameters: object) -> list[Any]:
        with self._changed, available(self._where):
            return self._db.execute(sql, parameters).fetchall()

    def _wait(self, timeout: float, attempt: Callable[[], _T]) -> _T:
        """`attempt()` until it returns something truthy or `timeout` seconds have passed:
        again at once after a write from this process, and every POLL_SECONDS for the others'."""
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                writes_seen = self._writes
            result = attempt()
            remaining = deadline - time.monotonic()
            if result or remaining <= 0:
                return result
            with self._changed:
                if self._writes == writes_seen:  # else a write came in during the attempt
                    self._changed.wait(min(remaining, POLL_SECONDS))

    def enqueue(self, queue: str, payload: JsonDict) -> str:
        with self._transaction() as db:
            [(number,)] = db.execute(
                "INSERT INTO jobs (queue, payload) VALUES (?, ?) RETURNING id",
                (queue, json.dumps(payload)),
            ).fetchall()
        return _identifier(number)

    def claim(self, queue: str, consumer: str, timeout: float) -> Job | None:
        return self._wait(timeout, lambda: self._claim_now(queue, consumer))

    def _claim_now(self, queue: str, consumer: str) -> Job | None:
        """Take the oldest job nobody holds: one never delivered, released, or whose holder
        timed out or exited. Every job ever delivered is older than every new one, so this is
        the expired one first, as with Redis. One whose payload cannot be read is dead-lettered
        in the same transaction, and the next one taken."""
        now = time.time()
        with self._transaction() as db:
            while True:
                rows = db.execute(
                    """
                    UPDATE jobs
                    SET consumer = ?, machine = ?, pid = ?, last_seen = ?,
                        deliveries = deliveries + 1
                    WHERE id = (
                        SELECT id FROM jobs
                        WHERE queue = ?
                          AND (consumer IS NULL OR last_seen <= ? OR holder_gone(machine, pid))
                        ORDER BY id LIMIT 1
                    )
                    RETURNING id, payload, deliveries
                    """,
                    (consumer, MACHINE, os.getpid(), now, queue, now - self._visibility_timeout),
                ).fetchall()
                if not rows:
                    return None
                [(number, text, deliveries)] = rows
                try:
                    return Job(_identifier(number), queue, parse_payload(text), deliveries)
                except UnreadablePayload as unreadable:
                    _bury(db, queue, number, consumer, str(unreadable))
                    log_unreadable(queue, _identifier(number), str(unreadable))

    def touch(self, job: Job, consumer: str) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                f"UPDATE jobs SET last_seen = ? {_HELD}", (time.time(), *_held(job, consumer))
            )
        return cursor.rowcount == 1

    def release(self, job: Job, consumer: str) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET consumer = NULL, machine = NULL, pid = NULL, last_seen = NULL, "
                f"deliveries = deliveries - 1 {_HELD}",
                _held(job, consumer),
            )
        return cursor.rowcount == 1

    def ack(self, job: Job, consumer: str) -> bool:
        with self._transaction() as db:
            cursor = db.execute(f"DELETE FROM jobs {_HELD}", _held(job, consumer))
        return cursor.rowcount == 1

    def dead_letter(self, job: Job, consumer: str, reason: str) -> bool:
        with self._transaction() as db:
            return _bury(db, job.queue, _number(job.job_id), consumer, reason)

    def dead_letters(self, queue: str) -> list[DeadLetter]:
        rows = self._query(
            "SELECT job_id, payload, deliveries, reason FROM dead_letters WHERE queue = ? "
            "ORDER BY id",
            queue,
        )
        return [
            DeadLetter(job_id, dead_letter_payload(payload), deliveries, reason)
            for job_id, payload, deliveries, reason in rows
        ]

    def pending_count(self, queue: str) -> int:
        [(count,)] = self._query(
            "SELECT COUNT(*) FROM jobs WHERE queue = ? AND consumer IS NOT NULL", queue
        )
        return int(count)

    def depth(self, queue: str) -> QueueDepth:
        [(waiting, pending)] = self._query(
            "SELECT COUNT(*) - COUNT(consumer), COUNT(consumer) FROM jobs WHERE queue = ?", queue
        )
        [(dead,)] = self._query("SELECT COUNT(*) FROM dead_letters WHERE queue = ?", queue)
        return QueueDepth(waiting=int(waiting), pending=int(pending), dead_letters=int(dead))

    def is_pending(self, queue: str, job_id: str) -> bool:
        return bool(
            self._query("SELECT 1 FROM jobs WHERE queue = ? AND id = ?", queue, _number(job_id))
        )

    def publish(self, channel: str, data: JsonDict) -> str:
        with self._transaction() as db:
            [(number,)] = db.execute(
                "INSERT INTO events (channel, data) VALUES (?, ?) RETURNING id",
                (channel, json.dumps(data)),
            ).fetchall()
            # Everything older than the channel's newest EVENTS_KEPT_PER_CHANNEL goes.
            db.execute(
                "DELETE FROM events WHERE channel = ? AND id <= (SELECT id FROM events "
                "WHERE channel = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (channel, channel, EVENTS_KEPT_PER_CHANNEL),
            )
            # This channel lives on; those quiet for events_ttl go whole, as Redis expires them.
            now = time.time()
            db.execute(
                "INSERT INTO channels (channel, last_event) VALUES (?, ?) "
                "ON CONFLICT (channel) DO UPDATE SET last_event = excluded.last_event",
                (channel, now),
            )
            expired = "SELECT channel FROM channels WHERE last_event < ?"
            db.execute(
                f"DELETE FROM events WHERE channel IN ({expired})", (now - self._events_ttl,)
            )
            db.execute("DELETE FROM channels WHERE last_event < ?", (now - self._events_ttl,))
        return _identifier(number)

    def read(self, channel: str, after: str, timeout: float) -> list[Event]:
        return self._wait(timeout, lambda: self._events_after(channel, after))

    def _events_after(self, channel: str, after: str) -> list[Event]:
        rows = self._query(
            "SELECT id, data FROM events WHERE channel = ? AND id > ? ORDER BY id",
            channel,
            _number(after),
        )
        return [Event(_identifier(number), json.loads(data)) for number, data in rows]

    def is_event_id(self, text: str) -> bool:
        return _IDENTIFIER.fullmatch(text) is not None and int(text) < 2**63

    def close(self) -> None:
        with self._changed:
            self._db.close()
