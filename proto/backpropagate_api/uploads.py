"""What the client and dataprep agree on about an upload: the id its preparation gets, so the
client can skip sending bytes already prepared the same way, and how the rows left out of it are
listed in a message.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backpropagate_api.v1 import dataprep_pb2

# Rows left out of an upload that a message lists.
SHOWN_REJECTIONS = 20


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def listed(rows: Sequence[Any], count: int | None = None) -> list[str]:
    """Rows left out (RowRejection, or its proto) as a message shows them: "line N: reason" for
    the first SHOWN_REJECTIONS, then how many more there are of `count` (default: all listed)."""
    count = len(rows) if count is None else count
    lines = [f"line {row.line}: {row.reason}" for row in rows[:SHOWN_REJECTIONS]]
    if count > len(lines):
        lines.append(f"... and {count - len(lines)} more")
    return lines


# Bumped when parsing or normalising changes what a file prepares to: an id made by older code
# must not stand for what newer code would store. 2: OpenAI content parts are kept as text, not
# left out; records count the rows left out.
PREPARATION_VERSION = 2


def prepared_dataset_id(content_sha256: str, header: dataprep_pb2.UploadDatasetHeader) -> str:
    """The id of `header`'s preparation of bytes whose sha256 is `content_sha256`: every upload
    option that changes the stored rows is in it (the file's kind by its name's extension, the
    format, column names, deduplication, strictness, languages), the file's name otherwise is
    not."""
    options = {
        "content": content_sha256,
        "version": PREPARATION_VERSION,
        "kind": _kind(header.filename),
        "format": header.format if header.format not in ("", "auto") else "auto",
        "columns": dict(sorted(header.columns.items())),
        "dedup": header.dedup or "none",
        "near_duplicate_threshold": header.near_duplicate_threshold,
        "strict": header.strict,
        "languages": sorted(header.languages),
    }
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


def _kind(filename: str) -> str:
    """The extensions that decide how a file is read: its own, and the one under a .gz."""
    name = Path(filename.lower())
    return "".join(name.suffixes[-2:]) if name.suffix == ".gz" else name.suffix
