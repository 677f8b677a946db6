"""The artifact store as a directory tree, for the CLI and a single-machine stack.

A key is a relative path under the root. Every write goes to a temporary file beside its target
and is renamed over it, so a reader sees the old object or the new one, never a torn one, even
when a writer dies mid-copy. Files are 0600 and directories 0700: what the store holds is its
owner's only.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from backpropagate_api.errors import NotFoundError, UserError
from backpropagate_api.private_files import private_directory, private_opener
from backpropagate_services.common.atomic import is_partial, staged
from backpropagate_services.common.store.base import CHUNK_SIZE, ArtifactStore


class LocalDirStore(ArtifactStore):
    def __init__(self, root: Path) -> None:
        self._root = root
        private_directory(root)

    def _path(self, key: str) -> Path:
        """The file of a key; refuses keys that would reach outside the root."""
        relative = PurePosixPath(key)
        if relative.is_absolute() or ".." in relative.parts:
            raise UserError(
                f"Artifact key {key!r} points outside the store.",
                hint="Keys are relative '/'-separated paths without '..'.",
                key=key,
            )
        return self._root.joinpath(*relative.parts)

    def _write_atomically(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        path = self._path(key)
        try:
            private_directory(path.parent)
            with staged(path) as staging, open(staging, "wb", opener=private_opener) as handle:
                write(handle)
        except BaseException:
            self._remove_empty_parents(path)  # and the directories made for it: no husks
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomically(key, lambda handle: handle.write(data))

    def put_file(self, key: str, path: Path) -> None:
        with path.open("rb") as source:
            self._write_atomically(
                key, lambda handle: shutil.copyfileobj(source, handle, CHUNK_SIZE)
            )

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise NotFoundError(f"No artifact at {key}.", key=key)
        return path

    def iter_chunks(
        self, key: str, chunk_size: int = CHUNK_SIZE, offset: int = 0
    ) -> Iterator[bytes]:
        with self._existing(key).open("rb") as handle:
            handle.seek(offset)
            yield from iter(lambda: handle.read(chunk_size), b"")

    def size(self, key: str) -> int:
        return self._existing(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        # A prefix is a string prefix, as in S3 ("runs/ab" matches "runs/abc/x"): walk the
        # deepest directory it names in full, then filter.
        directory = self._path(prefix.rpartition("/")[0])
        if not directory.is_dir():
            return []
        keys = (
            path.relative_to(self._root).as_posix()
            for path in directory.rglob("*")
            if path.is_file() and not is_partial(path)
        )
        return sorted(key for key in keys if key.startswith(prefix))

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            path = self._path(key)
            path.unlink(missing_ok=True)
            self._remove_empty_parents(path)

    def _remove_empty_parents(self, path: Path) -> None:
        """Drop directories emptied by a delete, so `list` and the disk show no husks."""
        for parent in path.parents:
            if parent == self._root:
                return
            try:
                parent.rmdir()
            except OSError:  # not empty: it and its parents still hold something
                return
