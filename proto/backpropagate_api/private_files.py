"""State only its owner may read: the home directory holds datasets, adapters, run records and
logs that other users of the machine must not see or change.

The mode is given where a file or directory is created (0600, 0700), not through the process's
umask: the client's process also writes files its user means to share (an export that Ollama,
running as another user, reads), and those keep the user's usual permissions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PRIVATE_DIRECTORY = 0o700
PRIVATE_FILE = 0o600


def private_directory(path: Path) -> Path:
    """`path`, created with its missing parents as 0700 directories (`mkdir -p` would give the
    parents the umask's mode); one that exists is left as it is."""
    for directory in reversed([path, *path.parents]):
        if not directory.exists():
            directory.mkdir(mode=PRIVATE_DIRECTORY, exist_ok=True)
    return path


def private_home(home: Path) -> Path:
    """The home directory, created 0700; one of ours that others may enter (made by an earlier
    version with the umask's mode) is closed to them."""
    private_directory(home)
    if sys.platform == "win32":  # no owner id here, and chmod sets only the read-only flag
        return home
    status = home.stat()
    if status.st_uid == os.getuid() and status.st_mode & 0o077:
        home.chmod(PRIVATE_DIRECTORY)
    return home


def private_opener(path: str, flags: int) -> int:
    """An `open(..., opener=private_opener)` that creates its file 0600."""
    return os.open(path, flags, PRIVATE_FILE)


def create_private_file(path: Path) -> Path:
    """`path` created empty as 0600 (in a 0700 directory) unless it exists: for a file that a
    library opens itself with the umask's mode (SQLite, logging), which then keeps this one."""
    private_directory(path.parent)
    os.close(private_opener(str(path), os.O_WRONLY | os.O_CREAT))
    return path
