"""How much one upload may make dataprep hold: its bytes once decoded, and one row.

The size of the file that was sent says little about what reading it costs: gzip turns a few
kilobytes into a gigabyte, and a Parquet page of one repeated character holds hundreds of
megabytes in a few kilobytes. So what the readers decode is counted against the same limit as
the bytes received (BACKPROPAGATE_DATAPREP__MAX_UPLOAD_BYTES), and every row of every kind of
file against MAX_ROW_BYTES, as it is read: a refusal comes before the memory is spent, and
before anything is stored.
"""

from __future__ import annotations

from typing import Any

from backpropagate_api.errors import DatasetParseError, DatasetTooLargeError

MiB = 2**20
# One row's limit: about two million tokens of text, past any context a model trains on.
MAX_ROW_BYTES = 8 * MiB


class ByteBudget:
    """Bytes counted against the upload limit as they are read (`limit` None: no limit)."""

    def __init__(self, filename: str, limit: int | None, counted: str = "") -> None:
        self.filename = filename
        self.limit = limit
        self.counted = counted  # how the bytes are counted: "", " once decompressed", ...
        self.spent = 0

    def spend(self, size: int) -> None:
        """Count `size` more bytes; DatasetTooLargeError once past the limit."""
        self.spent += size
        self.check(self.spent)

    def check(self, size: int) -> None:
        """DatasetTooLargeError if `size` bytes are past the limit."""
        if self.limit is not None and size > self.limit:
            raise DatasetTooLargeError(
                f"{self.filename or 'The dataset'} is larger than the {self.limit:,} bytes this "
                f"service accepts{self.counted}.",
                filename=self.filename,
                limit=self.limit,
            )


def row_too_large(filename: str, line: int, rows: int = 1) -> DatasetParseError:
    """The error of a row (or of `rows` rows from `line`, on average) past MAX_ROW_BYTES."""
    where = f"line {line}" if rows == 1 else f"lines {line} to {line + rows - 1} (on average)"
    return DatasetParseError(
        f"{filename} {where}: longer than the {MAX_ROW_BYTES // MiB} MiB one row may hold, far "
        "more than any model trains on in one row",
        hint="Split the document into rows, or leave it out.",
        filename=filename,
        line=line,
    )


def row_size(value: Any) -> int:
    """A table row's text in characters (at least as many bytes as UTF-8), nested cells too."""
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, dict):
        return sum(row_size(item) for item in value.values())
    if isinstance(value, list):
        return sum(row_size(item) for item in value)
    return 8  # a number, a boolean: a few bytes however it is written
