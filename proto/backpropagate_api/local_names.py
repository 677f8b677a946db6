"""Names written by someone else that become paths under a local directory: the files a stored
manifest lists, the files an export record tells the client to download. Each must stay inside
its directory whoever wrote it, so the store's readers and the client refuse the same names.
"""

from __future__ import annotations

from pathlib import Path

from backpropagate_api.errors import PathOutsideDirectoryError, quoted

# A part with one of these is no plain name: Windows reads '\' as a separator and ':' as a
# drive, and the OS refuses a NUL with a ValueError instead of an answer.
_NOT_IN_A_PART = frozenset("\\:\0")


def stays_inside(name: str) -> bool:
    """Whether `name`, '/'-separated and joined to any directory, names something inside it:
    not absolute, and no part that is empty, '.', '..' or holds a separator of another OS."""
    return all(
        part not in ("", ".", "..") and not _NOT_IN_A_PART & set(part) for part in name.split("/")
    )


def path_inside(directory: Path, name: str) -> Path:
    """`directory`/`name`; PathOutsideDirectoryError for a name that would leave it."""
    if not stays_inside(name):
        raise PathOutsideDirectoryError(
            f"Refused to write {quoted(name)} under {directory}: that name leaves the directory.",
            name=quoted(name),
            directory=directory,
        )
    return directory.joinpath(*name.split("/"))
