"""Build a file or directory under a temporary name beside its target, then rename it.

The one way anything here writes an artifact: a crash, a failed converter, a broken download
or a full disk must never leave something under the final name that looks finished. Readers see
the finished file or nothing, and a full disk is reported as RUNTIME_DISK_FULL naming the
directory (`disk_full`). Callers open the staged path themselves, so files get the usual
permissions (umask), not a temporary file's private ones.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from backpropagate_api.disk_full import reported_as_disk_full

PARTIAL_SUFFIX = ".partial"


def is_partial(path: Path) -> bool:
    """A write in progress (or left by a crash), not an artifact."""
    return path.name.startswith(".") and path.name.endswith(PARTIAL_SUFFIX)


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree, whichever it is; nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged(target: Path, *, replace_existing: bool = True) -> Iterator[Path]:
    """Yield a fresh path in the target's directory; rename it over the target on success.

    The staged path does not exist yet: the caller creates a file or a directory there. On any
    exception whatever was written is removed and the target is left untouched. With
    `replace_existing=False` a target that appeared meanwhile (another process won the race to
    build the same thing) is kept and the staged copy dropped. A full disk met on the way is
    raised as DiskFullError, after the staged copy is removed.
    """
    with reported_as_disk_full(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
        try:
            yield staging
            if target.exists() and not replace_existing:
                remove_path(staging)
                return
            if target.is_dir() and staging.is_dir():
                # os.replace cannot swap a non-empty directory: clear the old export first.
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            remove_path(staging)
            raise
