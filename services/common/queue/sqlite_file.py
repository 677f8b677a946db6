"""The embedded queue's SQLite file: its tables, and what makes one file safe to share between
the processes of a machine.

The queue makes every write a BEGIN IMMEDIATE transaction, so two processes claiming at once are
serialised by SQLite's write lock instead of both reading the same free job; a process finding
the lock taken waits for it (the busy timeout) instead of failing. WAL lets readers (a `runs
watch`) go on while a writer commits. WAL needs shared memory, hence a local disk: not NFS.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from backpropagate_services.common.errors import QueueUnavailableError

BUSY_TIMEOUT_SECONDS = 30.0

# A job's row lives from enqueue to ack or dead letter. Ids only grow (AUTOINCREMENT never reuses
# one), so they order jobs and events by creation. `deliveries` counts deliveries that did not
# end in a release; `last_seen` is wall-clock (time.time()) as it must outlive the process.
_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    payload TEXT NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    consumer TEXT,  -- NULL: waiting for a claim
    machine TEXT,   -- where the holder's pid names a process
    pid INTEGER,
    last_seen REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_queue ON jobs (queue, id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_channel ON events (channel, id);
-- When each channel last had an event (wall-clock): quiet ones expire (EVENTS_TTL_SECONDS).
CREATE TABLE IF NOT EXISTS channels (
    channel TEXT PRIMARY KEY,
    last_event REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS channels_by_last_event ON channels (last_event);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    job_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    deliveries INTEGER NOT NULL,
    reason TEXT NOT NULL
);
COMMIT;
"""


def _this_machine() -> str:
    """Where a pid names one process: the host, and its pid namespace where Linux has them (a
    container may share the host's name, never its process numbers)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()} {namespace}".strip()


MACHINE = _this_machine()


def holder_gone(machine: str | None, pid: int | None) -> bool:
    """Whether a claim's holder process has exited: only knowable for one on this machine."""
    if machine != MACHINE or pid is None:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, run by another user
        return False
    return False


@contextmanager
def available(where: str) -> Iterator[None]:
    """The file's failures (cannot open it, lock held past the busy timeout, disk full) as the
    queue being unavailable: retryable, and naming the file."""
    try:
        yield
    except (sqlite3.OperationalError, OSError) as error:
        raise QueueUnavailableError(
            f"Cannot use the queue database {where}: {error}",
            hint="Check that the file is on a local disk and writable, or set "
            "BACKPROPAGATE_QUEUE__EMBEDDED_PATH to one that is.",
            where=where,
        ) from error


def connect(path: Path | None) -> sqlite3.Connection:
    """Open (creating it if needed) the queue file; None: a private in-memory database.

    One connection, used under the caller's lock from any thread; transactions are explicit.
    """
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(
        ":memory:" if path is None else path,
        timeout=BUSY_TIMEOUT_SECONDS,
        isolation_level=None,
        check_same_thread=False,
    )
    db.execute("PRAGMA journal_mode = WAL")
    # A commit survives its process crashing, the case that matters here; only a power cut may
    # lose the last ones, and a job whose ack is lost is redelivered, then acked as ended.
    db.execute("PRAGMA synchronous = NORMAL")
    db.create_function("holder_gone", 2, holder_gone)
    db.executescript(_SCHEMA)
    return db
