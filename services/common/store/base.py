"""What services need from an artifact store, wherever the bytes live.

Keys are '/'-separated paths (datasets/<sha256>/data.jsonl, runs/<run_id>/adapter/...). A single
object is never seen half-written: the local store writes a temporary file and renames it, S3
makes an object visible only when its upload completes. A directory of objects is committed by
writing its MANIFEST.json last (`put_dir`); readers that go through `get_dir` never see a
directory without one.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backpropagate_api.errors import ArtifactInvalidError, NotFoundError
from backpropagate_api.local_names import stays_inside
from backpropagate_api.uploads import sha256_file
from backpropagate_services.common.atomic import staged

if TYPE_CHECKING:
    from backpropagate_api.settings import Settings

MANIFEST = "MANIFEST.json"
CHUNK_SIZE = 1024 * 1024


class ArtifactStore(ABC):
    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def iter_chunks(
        self, key: str, chunk_size: int = CHUNK_SIZE, offset: int = 0
    ) -> Iterator[bytes]:
        """The object's bytes in order from `offset` (to resume a download); raises
        NotFoundError for a missing key."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes; raises NotFoundError for a missing key."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under the prefix, sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    # -- built on the primitives above, shared by both implementations ------------------------

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_chunks(key))

    def put_json(self, key: str, value: Any) -> None:
        self.put_bytes(key, json.dumps(value, indent=2, sort_keys=True).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def download(self, key: str, dest: Path) -> Path:
        """Write the object to `dest` atomically (a partial download never has the final name)."""
        with staged(dest) as staging, staging.open("wb") as handle:
            for chunk in self.iter_chunks(key):
                handle.write(chunk)
        return dest

    def put_dir(self, prefix: str, source: Path) -> dict[str, Any]:
        """Upload every file under `source`, then commit the set with a manifest."""
        prefix = prefix.rstrip("/")
        files = {}
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            relative = path.relative_to(source).as_posix()
            self.put_file(f"{prefix}/{relative}", path)
            files[relative] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        manifest = {"files": files}
        self.put_json(f"{prefix}/{MANIFEST}", manifest)
        return manifest

    def get_dir(self, prefix: str, dest: Path) -> Path:
        """Download a directory committed by `put_dir`, every file checked against the size and
        sha256 its manifest recorded; refuses one without a manifest."""
        prefix = prefix.rstrip("/")
        manifest_key = f"{prefix}/{MANIFEST}"
        if not self.exists(manifest_key):
            raise NotFoundError(
                f"No complete artifact at {prefix}/ (no {MANIFEST}).",
                hint="The job that writes it may have failed or still be running.",
                key=prefix,
            )
        files = _manifest_files(self.get_json(manifest_key), prefix)
        for relative, expected in files.items():
            path = self.download(f"{prefix}/{relative}", dest / relative)
            if path.stat().st_size != expected["size"] or sha256_file(path) != expected["sha256"]:
                path.unlink()
                raise ArtifactInvalidError(
                    f"{prefix}/{relative} is not the file its manifest committed (size or "
                    "sha256 differ).",
                    key=f"{prefix}/{relative}",
                )
        return dest


def _manifest_files(manifest: Any, prefix: str) -> dict[str, dict[str, Any]]:
    """The manifest's files, each a relative path inside the directory with its size and
    sha256; anything else (an absolute path, `..`, a malformed entry) is refused before a byte
    is written, so a tampered store cannot write outside the destination."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ArtifactInvalidError(f"{prefix}/{MANIFEST} lists no files.", key=prefix)
    for relative, entry in files.items():
        inside = isinstance(relative, str) and stays_inside(relative)
        described = (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) is not None
        )
        if not (inside and described):
            raise ArtifactInvalidError(
                f"{prefix}/{MANIFEST} lists {relative!r}, which is not a file inside the "
                "directory with its size and sha256.",
                key=prefix,
            )
    return files


def make_store(settings: Settings) -> ArtifactStore:
    """The store the settings ask for."""
    if settings.store.backend == "s3":
        from backpropagate_services.common.store.s3 import S3Store

        return S3Store.from_settings(settings.store)
    from backpropagate_services.common.store.local import LocalDirStore

    return LocalDirStore(settings.local_store_root)
