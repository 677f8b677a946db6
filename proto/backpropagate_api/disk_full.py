"""A full disk, wherever a write meets it, as one error that says where: RUNTIME_DISK_FULL.

No space left (ENOSPC), a quota reached (EDQUOT) and a file size limit (EFBIG) mean the same
to a user: nothing can be written there until space is made, and the same job then succeeds.
Raw, they reached users as an unexpected OSError (INTERNAL, "a bug") that named no disk. Every
artifact is written through `atomic.staged`, which reports them naming the directory written
to; `as_backpropagate_error` reports any that escaped elsewhere (a temporary file), so each
service says the same thing without catching it itself.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from backpropagate_api.errors import BackpropagateError, DiskFullError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Native writers pass Rust's io::Error on inside an exception class of their own (safetensors'
# SafetensorError), whose text ends as Rust prints one: "No space left on device (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _errno_of(error: BaseException) -> int | None:
    """The errno behind `error`, or behind the error it was raised in handling: torch's writer,
    handed an OSError by the file it writes to, fails again closing the archive."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError):
            return cause.errno
        found = _RUST_OS_ERROR.search(str(cause))
        if found:
            return int(found.group(1))
        cause = cause.__cause__ or cause.__context__
    return None


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is a write refused for want of space (ours already say what they are)."""
    return not isinstance(error, BackpropagateError) and _errno_of(error) in DISK_FULL_ERRNOS


def no_space_error(place: str, reason: str, **context: object) -> DiskFullError:
    """RUNTIME_DISK_FULL for a write to `place` ("the disk that holds /srv/artifacts", "S3
    bucket 'backpropagate'"), with a hint that says where to free space."""
    return DiskFullError(
        f"No space to write to {place}: {reason.rstrip('.')}.",
        hint=f"Free space on {place}, then run the command again (`backprop runs resume RUN` "
        "goes on from the run's last checkpoint); nothing half-written was kept.",
        **context,
    )


def disk_full_error(error: BaseException, where: Path | None = None) -> DiskFullError:
    """`error` (one `is_disk_full` accepts) as RUNTIME_DISK_FULL, naming `where`, else the
    directory of the file the error names, if it names one."""
    filename = getattr(error, "filename", None)
    if where is None and isinstance(filename, str | bytes | os.PathLike):
        where = Path(os.fsdecode(filename)).parent
    reason = os.strerror(_errno_of(error) or errno.ENOSPC)
    if where is None:
        return DiskFullError(f"A write failed: {reason}.")
    return no_space_error(f"the disk that holds {where}", reason, path=where)


@contextmanager
def reported_as_disk_full(where: Path) -> Iterator[None]:
    """Raise a full disk met by the body's writes under `where` as RUNTIME_DISK_FULL."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise disk_full_error(error, where) from error
