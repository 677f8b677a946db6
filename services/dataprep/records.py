"""A dataset file's rows, whatever kind of file it is: JSON Lines, CSV / TSV, Parquet, or plain
text (.txt: a document a line, each read as {"text": line}); any but Parquet also gzipped
(data.csv.gz).

Each row comes with its place in the file (the line a CSV record starts on, a Parquet row's
1-based index), and as a JSON object's text (decoded by the parser, so a bad line is that row's
error) or as a dict of columns. Columns are renamed to the names the formats know: `prompt` /
`response` become Alpaca's `instruction` / `output`, and `columns` maps any others
(`{"question": "instruction", "answer": "output"}`).

Every row of every kind is held to limits.MAX_ROW_BYTES (a row past it is that row's error), and
what the file decodes to to the upload limit (DatasetTooLargeError): see limits.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeAlias

from backpropagate_api.errors import DatasetParseError
from backpropagate_services.dataprep import limits
from backpropagate_services.dataprep.encoding import not_decodable, text_lines, uncompressed_name
from backpropagate_services.dataprep.limits import ByteBudget
from backpropagate_services.dataprep.parquet_pages import repeatable_bytes

if TYPE_CHECKING:  # imported when a Parquet file is read: most uploads are not
    import pyarrow as pa
    import pyarrow.parquet as pq

# A JSON object's text, a table row's columns, or what is wrong with that row.
TableRow: TypeAlias = dict[str, Any] | DatasetParseError
Record: TypeAlias = str | TableRow
PARQUET_MAGIC = b"PAR1"
DELIMITERS = {".csv": ",", ".tsv": "\t"}
# Column names other tools use for the fields of ours, when the row is not a preference.
COLUMN_ALIASES = {"prompt": "instruction", "response": "output", "completion": "output"}
TRUE_LABELS = {"true", "1", "yes", "good"}
FALSE_LABELS = {"false", "0", "no", "bad"}
PARQUET_BATCH_ROWS = 1024
# What a batch of Parquet rows may decode to, at worst (`_batch_rows`): a file of big rows is
# read a few rows at a time.
PARQUET_BATCH_BYTES = 32 * limits.MiB


def file_records(
    path: Path,
    filename: str,
    columns: Mapping[str, str] | None = None,
    max_bytes: int | None = None,
) -> Iterator[tuple[int, Record]]:
    """(place, record) for every row of the file, by its kind: the name's extension, or
    Parquet's magic bytes whatever the name. `max_bytes`: what the file may decode to."""
    with path.open("rb") as handle:
        parquet = handle.read(4) == PARQUET_MAGIC
    suffix = Path(uncompressed_name(path, filename)).suffix.lower()
    if parquet or suffix == ".parquet":
        rows: Iterator[tuple[int, TableRow]] = _parquet_rows(
            path, filename, ByteBudget(filename, max_bytes, " once decoded")
        )
    elif suffix in DELIMITERS:
        rows = _delimited_rows(path, filename, DELIMITERS[suffix], max_bytes)
    elif suffix == ".txt":
        lines = enumerate(text_lines(path, filename, max_bytes), start=1)
        yield from ((place, {"text": line}) for place, line in lines if line.strip())
        return
    else:
        yield from enumerate(text_lines(path, filename, max_bytes), start=1)
        return
    for place, row in rows:
        if isinstance(row, DatasetParseError):
            yield place, row
        elif limits.row_size(row) > limits.MAX_ROW_BYTES:
            yield place, limits.row_too_large(filename, place)
        else:
            yield place, renamed(row, columns or {})


def renamed(row: dict[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """The row with its columns under the names the formats read; null cells (Parquet's) left
    out, empty ones kept so that the row's error names the field."""
    mapped = {columns.get(name, name): value for name, value in row.items()}
    if not ({"chosen", "rejected", "label"} & mapped.keys()):  # a preference keeps its prompt
        mapped = {COLUMN_ALIASES.get(name, name): value for name, value in mapped.items()}
    if isinstance(mapped.get("label"), str):
        mapped["label"] = _label(mapped["label"])
    return {name: value for name, value in mapped.items() if value is not None}


def _label(text: str) -> bool | str:
    """A CSV cell's label as the boolean KTO takes; anything else is left for the row's error."""
    lowered = text.strip().lower()
    if lowered in TRUE_LABELS:
        return True
    if lowered in FALSE_LABELS:
        return False
    return text


def _delimited_rows(
    path: Path, filename: str, delimiter: str, max_bytes: int | None
) -> Iterator[tuple[int, TableRow]]:
    # The line ends go back in: a quoted cell may span lines, and keeps them.
    lines = (line + "\n" for line in text_lines(path, filename, max_bytes))
    reader = csv.DictReader(lines, delimiter=delimiter)
    try:
        header = reader.fieldnames or []  # read now: the first record starts after it
        first_line = reader.line_num + 1
        for row in reader:
            named = len(header)
            if None in row:  # more cells than the header names: that row's error
                yield (
                    first_line,
                    DatasetParseError(
                        f"{filename} line {first_line}: {named + len(row[None])} cells, but the "
                        f"header names {named} columns",
                        filename=filename,
                        line=first_line,
                    ),
                )
            else:
                yield first_line, dict(row)
            first_line = reader.line_num + 1
    except csv.Error as exc:
        raise DatasetParseError(
            f"{filename} line {reader.line_num}: not valid CSV ({exc})",
            filename=filename,
            line=reader.line_num,
        ) from exc


def _parquet_rows(path: Path, filename: str, decoded: ByteBudget) -> Iterator[tuple[int, TableRow]]:
    """A row group at a time, in batches that decode to at most PARQUET_BATCH_BYTES. The footer
    says what each row group decodes to (the compressed file says nothing): a file past the
    limit, or a row group whose rows are past MAX_ROW_BYTES on average (one 300 MB value that
    compressed to kilobytes), is refused before any of it is decoded; what is decoded is counted
    too, for a footer that understates it (a dictionary's value counts once, however many rows
    repeat it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetParseError(
            f"{filename}: not a readable Parquet file ({exc})", filename=filename
        ) from exc
    groups = [table.metadata.row_group(index) for index in range(table.metadata.num_row_groups)]
    decoded.check(sum(group.total_byte_size for group in groups))
    first = 1
    for index, group in enumerate(groups):
        if group.num_rows and group.total_byte_size > limits.MAX_ROW_BYTES * group.num_rows:
            raise limits.row_too_large(filename, first, group.num_rows)
        with path.open("rb") as handle:
            worst = _worst_row(group, handle)
        batch_rows = max(1, min(PARQUET_BATCH_ROWS, PARQUET_BATCH_BYTES // worst))
        for batch in table.iter_batches(batch_size=batch_rows, row_groups=[index]):
            decoded.spend(batch.nbytes)
            yield from _batch_rows(batch, filename, first)
            first += batch.num_rows
            del batch  # before the next one is decoded: one batch at a time in memory


def _worst_row(group: pq.RowGroupMetaData, handle: BinaryIO) -> int:
    """What one row of the group may decode to: of each column, its share of the chunk, or the
    longest value a row may repeat (parquet_pages) up to MAX_ROW_BYTES, whichever is more."""
    rows = max(1, group.num_rows)
    columns = [group.column(index) for index in range(group.num_columns)]
    return max(
        1,
        sum(
            max(
                column.total_uncompressed_size // rows,
                min(repeatable_bytes(handle, column), limits.MAX_ROW_BYTES),
            )
            for column in columns
        ),
    )


def _batch_rows(batch: pa.RecordBatch, filename: str, first: int) -> Iterator[tuple[int, TableRow]]:
    """A record batch's rows from place `first`. Arrow does not check that a string column
    holds UTF-8: a row whose text does not decode is that row's error."""
    try:
        return enumerate(batch.to_pylist(), start=first)
    except UnicodeDecodeError:
        return (
            (first + n, _row_or_error(batch.slice(n, 1), filename, first + n))
            for n in range(batch.num_rows)
        )


def _row_or_error(one_row: pa.RecordBatch, filename: str, place: int) -> TableRow:
    try:
        row: dict[str, Any] = one_row.to_pylist()[0]
    except UnicodeDecodeError as exc:
        return not_decodable(filename, place, "UTF-8", f"{exc.reason} in a text cell")
    return row
