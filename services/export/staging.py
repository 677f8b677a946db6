"""Build a file or directory under a temporary name beside its target, then rename it.

A crash, a failed converter or a failed quantisation must never leave something under the
final name that looks like a finished export: readers see the finished artifact or nothing.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree, whichever it is; nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """Yield a fresh path in the target's directory; rename it over the target on success.

    The staged path does not exist yet: the caller creates a file or a directory there. On any
    exception whatever was written is removed and the target is left untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield staging
        if target.is_dir() and staging.is_dir():
            # os.replace cannot swap a non-empty directory: clear the old export first.
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        remove_path(staging)
        raise
