"""A dataset file's rows, whatever kind of file it is: JSON Lines, CSV / TSV, Parquet, or plain
text (.txt: a document a line, each read as {"text": line}); any but Parquet also gzipped
(data.csv.gz).

Each row comes with its place in the file (the line a CSV record starts on, a Parquet row's
1-based index), and as a JSON object's text (decoded by the parser, so a bad line is that row's
error) or as a dict of columns. Columns are renamed to the names the formats know: `prompt` /
`response` become Alpaca's `instruction` / `output`, and `columns` maps any others
(`{"question": "instruction", "answer": "output"}`).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeAlias

from backpropagate_services.common.errors import DatasetParseError
from backpropagate_services.dataprep.encoding import text_lines, uncompressed_name

# A JSON object's text, a table row's columns, or what is wrong with that row.
TableRow: TypeAlias = dict[str, Any] | DatasetParseError
Record: TypeAlias = str | TableRow
PARQUET_MAGIC = b"PAR1"
DELIMITERS = {".csv": ",", ".tsv": "\t"}
# Column names other tools use for the fields of ours, when the row is not a preference.
COLUMN_ALIASES = {"prompt": "instruction", "response": "output", "completion": "output"}
TRUE_LABELS = {"true", "1", "yes", "good"}
FALSE_LABELS = {"false", "0", "no", "bad"}


def file_records(
    path: Path, filename: str, columns: Mapping[str, str] | None = None
) -> Iterator[tuple[int, Record]]:
    """(place, record) for every row of the file, by its kind: the name's extension, or
    Parquet's magic bytes whatever the name."""
    with path.open("rb") as handle:
        parquet = handle.read(4) == PARQUET_MAGIC
    suffix = Path(uncompressed_name(path, filename)).suffix.lower()
    if parquet or suffix == ".parquet":
        rows: Iterator[tuple[int, TableRow]] = _parquet_rows(path, filename)
    elif suffix in DELIMITERS:
        rows = _delimited_rows(path, filename, DELIMITERS[suffix])
    elif suffix == ".txt":
        lines = enumerate(text_lines(path, filename), start=1)
        yield from ((place, {"text": line}) for place, line in lines if line.strip())
        return
    else:
        yield from enumerate(text_lines(path, filename), start=1)
        return
    for place, row in rows:
        yield place, row if isinstance(row, DatasetParseError) else renamed(row, columns or {})


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


def _delimited_rows(path: Path, filename: str, delimiter: str) -> Iterator[tuple[int, TableRow]]:
    # The line ends go back in: a quoted cell may span lines, and keeps them.
    lines = (line + "\n" for line in text_lines(path, filename))
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


def _parquet_rows(path: Path, filename: str) -> Iterator[tuple[int, TableRow]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetParseError(
            f"{filename}: not a readable Parquet file ({exc})", filename=filename
        ) from exc
    place = 0
    for batch in table.iter_batches(batch_size=1024):  # a batch at a time: bounded memory
        for row in batch.to_pylist():
            place += 1
            yield place, row
