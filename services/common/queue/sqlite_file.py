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

import psutil

from backpropagate_api.errors import QueueCorruptError, QueueUnavailableError
from backpropagate_api.private_files import create_private_file

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
    """Whether a claim's holder process has exited: only knowable for one on this machine.

    Asked through psutil, never `os.kill(pid, 0)`: on Windows that call terminates the process.
    """
    if machine != MACHINE or pid is None:
        return False
    return not psutil.pid_exists(pid)


# SQLite's primary result codes for a file that is damaged, or not a database at all.
_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


@contextmanager
def available(where: str) -> Iterator[None]:
    """The file's failures as our errors, naming the file: a damaged file as corrupt (no retry
    mends it: the hint says how to start afresh), the rest (cannot open it, lock held past the
    busy timeout, disk full) as the queue being unavailable, which is retryable."""
    try:
        yield
    except sqlite3.DatabaseError as error:
        # Only errors from SQLite itself carry a result code (not "closed database").
        if getattr(error, "sqlite_errorcode", 0) & 0xFF in _DAMAGED:
            raise QueueCorruptError(
                f"The queue database {where} is damaged: {error}",
                hint=f"Move {where} aside (with its -wal and -shm files, if any): the next "
                "command starts an empty queue there. Runs and exports stay in the store; the "
                "jobs waiting in the queue are lost: `backprop runs resume RUN` goes on with a "
                "run that had started, train again for one that had not.",
                where=where,
            ) from error
        if isinstance(error, sqlite3.OperationalError):
            raise _unavailable(where, error) from error
        raise
    except OSError as error:
        raise _unavailable(where, error) from error


def _unavailable(where: str, error: Exception) -> QueueUnavailableError:
    return QueueUnavailableError(
        f"Cannot use the queue database {where}: {error}",
        hint="Check that the file is on a local disk and writable, or set "
        "BACKPROPAGATE_QUEUE__EMBEDDED_PATH to one that is.",
        where=where,
    )


def connect(path: Path | None) -> sqlite3.Connection:
    """Open (creating it if needed) the queue file; None: a private in-memory database.

    One connection, used under the caller's lock from any thread; transactions are explicit.
    The file is its owner's only (0600), as are the WAL and shared-memory files SQLite makes
    beside it with its mode.
    """
    if path is not None:
        create_private_file(path)
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
