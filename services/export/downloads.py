"""Which stored keys DownloadArtifact serves: the files an export lists, and a run's loss curve.

Nothing else: not a dataset (another user's data), a checkpoint, a record, or a key outside the
layout. A key is refused by its shape or by the export's own list, never by whether it exists,
so a refusal tells a caller nothing about what the store holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from backpropagate_api.errors import (
    ArtifactNotDownloadableError,
    ConfigError,
    NotFoundError,
    quoted,
)
from backpropagate_api.ids import ID_PATTERN
from backpropagate_api.layout import export_record_key
from backpropagate_api.v1 import export_pb2
from backpropagate_services.common.records import load_record
from backpropagate_services.common.store.base import ArtifactStore

EXPORT_FILE = re.compile(rf"exports/(?P<export_id>{ID_PATTERN})/.+")
LOSS_CURVE = re.compile(rf"runs/{ID_PATTERN}/loss\.png")


def check_downloadable(store: ArtifactStore, key: str) -> None:
    """Raise ArtifactNotDownloadableError unless `key` is one of an export's files or a run's
    loss curve."""
    if LOSS_CURVE.fullmatch(key):
        return
    match = EXPORT_FILE.fullmatch(key)
    if match:
        try:
            export = load_record(
                store,
                export_record_key(match["export_id"]),
                export_pb2.ExportResult,
                "export",
            )
        except NotFoundError:
            export = export_pb2.ExportResult()
        if key in {file.key for file in export.files}:
            return
    raise ArtifactNotDownloadableError(
        f"{quoted(key)} is not an artifact to download.", key=key[:200]
    )


def artifact_chunks(
    store: ArtifactStore, request: export_pb2.DownloadArtifactRequest
) -> Iterator[export_pb2.ArtifactChunk]:
    """DownloadArtifact's answer: a downloadable key's bytes from `request.offset`, the first
    chunk carrying the total size. Checked before the first chunk is yielded."""
    if request.offset < 0:
        raise ConfigError("offset must not be negative.", field="offset")
    check_downloadable(store, request.key)
    total = store.size(request.key)
    chunks = store.iter_chunks(request.key, offset=request.offset)
    for index, chunk in enumerate(chunks):
        yield export_pb2.ArtifactChunk(data=chunk, total_size=total if index == 0 else 0)
