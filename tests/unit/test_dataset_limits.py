"""What one upload may make dataprep hold: a few kilobytes that decode into gigabytes (gzip, a
Parquet page of one value) are refused as they are read, before the memory is spent and with
nothing stored; rows left out are counted, with only the first of them kept as examples; the
preview of the first row is shortened."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backpropagate.connection import Connection
from backpropagate.workflows import upload_dataset
from backpropagate_api.errors import DatasetParseError, DatasetTooLargeError
from backpropagate_api.settings import Settings
from backpropagate_services.common import datasets
from backpropagate_services.common.datasets import load_record
from backpropagate_services.common.store.local import LocalDirStore
from backpropagate_services.dataprep import limits, parquet_pages
from backpropagate_services.dataprep.formats import parse_jsonl, parse_records
from backpropagate_services.dataprep.records import file_records
from backpropagate_services.stack import start_stack

MiB = 2**20


def messages(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def chat(question: str, answer: str) -> str:
    return json.dumps({"messages": messages(question, answer)})


@contextmanager
def connected(home: Path, max_upload_bytes: int | None = None) -> Iterator[Connection]:
    """A client of a dataprep service storing under `home`."""
    dataprep = {"max_upload_bytes": max_upload_bytes} if max_upload_bytes else {}
    stack = start_stack(Settings(home=home, dataprep=dataprep), ["dataprep"], "127.0.0.1:0")
    connection = Connection({"dataprep": stack.address}, False)
    try:
        yield connection
    finally:
        connection.close()
        stack.stop()


@pytest.fixture
def dataprep(tmp_path: Path) -> Iterator[Connection]:
    with connected(tmp_path / "home") as connection:
        yield connection


def stored_files(home: Path) -> list[Path]:
    return [path for path in home.rglob("*") if path.name in ("data.jsonl", "info.json")]


def write_parquet(path: Path, texts: list[str], **options: object) -> Path:
    """A table of one `text` column, compressed as an attacker would: a long run of one
    character shrinks to almost nothing."""
    pq.write_table(pa.table({"text": texts}), path, compression="zstd", **options)
    return path


# --- removed and rejected rows: counted, the first few kept --------------------------------------


def test_exact_dedup_of_many_identical_rows_counts_them_and_keeps_only_the_first_examples(
    tmp_path: Path, dataprep: Connection
):
    rows = 5000
    path = tmp_path / "same.jsonl.gz"
    path.write_bytes(gzip.compress((chat("Hi", "Hello") + "\n").encode() * rows))

    info = upload_dataset(dataprep, path, dedup="exact")

    kept = datasets.KEPT_ROW_EXAMPLES
    assert len(info.removed) == kept
    assert (info.num_examples, info.rows_read, info.rows_removed) == (1, rows, rows - 1)
    assert [row.line for row in info.removed] == list(range(2, kept + 2))
    store = LocalDirStore(tmp_path / "home" / "artifacts")
    record = load_record(store, info.dataset_id)
    assert (record.rows_removed, len(record.removed)) == (rows - 1, kept)
    [info_json] = (tmp_path / "home").rglob("info.json")
    assert info_json.stat().st_size < 50_000


def test_a_lenient_parse_counts_every_bad_row_and_keeps_the_first_as_examples():
    bad = 150
    lines = [chat(f"Q{n}", "A") for n in range(1500)] + ["{broken"] * bad

    parsed = parse_jsonl(lines, "mixed.jsonl", strict=False)

    assert len(parsed.rejected) == datasets.KEPT_ROW_EXAMPLES
    assert parsed.rows_rejected == bad
    assert parsed.rejected[0].line == 1501


def test_an_upload_answers_with_the_count_of_rows_left_out_beside_the_examples(
    tmp_path: Path, dataprep: Connection
):
    path = tmp_path / "mixed.jsonl"
    lines = [chat(f"Q{n}", "A") for n in range(1500)] + ["{broken"] * 120
    path.write_text("\n".join(lines) + "\n")

    info = upload_dataset(dataprep, path)

    assert (info.rows_rejected, len(info.rejections)) == (120, datasets.KEPT_ROW_EXAMPLES)
    assert (info.num_examples, info.rows_read) == (1500, 1620)


# --- decoded size: the limit holds however small the file that was sent --------------------------


def test_a_gzip_that_decompresses_past_the_upload_limit_is_refused_and_stores_nothing(
    tmp_path: Path,
):
    limit = 100_000
    path = tmp_path / "bomb.jsonl.gz"
    path.write_bytes(gzip.compress((chat("Hi", "Hello " * 20) + "\n").encode() * 20_000))
    assert path.stat().st_size < limit  # what was sent is well under the limit

    with (
        connected(tmp_path / "home", max_upload_bytes=limit) as connection,
        pytest.raises(DatasetTooLargeError) as caught,
    ):
        upload_dataset(connection, path)

    error = caught.value
    assert error.code == "INPUT_DATASET_TOO_LARGE"
    assert "once decompressed" in error.message and f"{limit:,} bytes" in error.message
    assert error.context == {"filename": "bomb.jsonl.gz", "limit": str(limit)}
    assert "MAX_UPLOAD_BYTES" in error.hint
    assert stored_files(tmp_path / "home") == []


def test_a_parquet_file_whose_data_is_past_the_upload_limit_is_refused_before_it_is_read(
    tmp_path: Path,
):
    limit = 1_000_000
    path = write_parquet(tmp_path / "wide.parquet", ["x" * 2 * limit])
    assert path.stat().st_size < 10_000

    with pytest.raises(DatasetTooLargeError, match="once decoded") as caught:
        list(file_records(path, path.name, max_bytes=limit))

    assert caught.value.context == {"filename": "wide.parquet", "limit": str(limit)}


READ_AND_REPORT_PEAK = """
import sys
from pathlib import Path
from backpropagate_services.common.hardware import peak_rss_bytes
from backpropagate_services.dataprep.records import file_records
import pyarrow.parquet

path = Path(sys.argv[1])
base = peak_rss_bytes()
rows = sum(1 for _ in file_records(path, path.name))
print(rows, peak_rss_bytes() - base)
"""


def test_a_parquet_dictionary_repeating_one_big_value_is_decoded_a_few_rows_at_a_time(
    tmp_path: Path,
):
    """The footer counts a dictionary's value once, however many rows repeat it: 100 rows of
    one 4 MiB value are a file of a few hundred bytes that decodes to 400 MiB."""
    texts = ["z" * 4 * MiB] * 100
    path = write_parquet(tmp_path / "dictionary.parquet", texts, dictionary_pagesize_limit=2**30)
    assert path.stat().st_size < 10_000

    done = subprocess.run(
        [sys.executable, "-c", READ_AND_REPORT_PEAK, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )

    rows, grown = map(int, done.stdout.split())
    assert rows == 100
    assert grown < 250 * MiB  # read whole: 1.2 GiB here (the batch, its rows, their copies)


def test_what_a_parquet_row_may_repeat_is_its_dictionarys_size_not_the_whole_columns(
    tmp_path: Path,
):
    """A big table of short distinct texts is still read many rows at a time: each row may
    repeat a dictionary value, and the dictionary page's header bounds them."""
    texts = [f"Document number {n}, " + "words " * (n % 50) for n in range(20_000)]
    longest = max(len(text) for text in texts)
    path = write_parquet(tmp_path / "table.parquet", texts)
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)

    with path.open("rb") as handle:
        repeatable = parquet_pages.repeatable_bytes(handle, column)

    assert longest < repeatable < column.total_uncompressed_size
    plain = write_parquet(tmp_path / "plain.parquet", texts, use_dictionary=False)
    plain_column = pq.ParquetFile(plain).metadata.row_group(0).column(0)
    with plain.open("rb") as handle:
        assert parquet_pages.repeatable_bytes(handle, plain_column) == 0  # each decodes once


# --- one row: capped in every kind of file, not only a JSON line ---------------------------------


def test_a_parquet_cell_past_the_row_limit_is_refused_at_its_row_and_stores_nothing(
    tmp_path: Path, dataprep: Connection
):
    path = write_parquet(tmp_path / "one_cell.parquet", ["x" * (limits.MAX_ROW_BYTES + MiB)])
    assert path.stat().st_size < 10_000

    with pytest.raises(DatasetParseError) as caught:
        upload_dataset(dataprep, path)

    error = caught.value
    assert error.code == "INPUT_DATASET_PARSE"
    assert error.context == {"filename": "one_cell.parquet", "line": "1"}
    assert f"longer than the {limits.MAX_ROW_BYTES // MiB} MiB one row may hold" in error.message
    assert stored_files(tmp_path / "home") == []


def test_a_big_cell_among_small_rows_is_that_rows_error_and_the_others_are_kept(tmp_path: Path):
    texts = [f"A short document, number {n}." for n in range(200)]
    texts[57] = "y" * (limits.MAX_ROW_BYTES + 1)
    path = write_parquet(tmp_path / "mixed.parquet", texts)

    parsed = parse_records(file_records(path, path.name), path.name, strict=False)

    [rejection] = parsed.rejected
    assert (rejection.line, rejection.code) == (58, "INPUT_DATASET_PARSE")
    assert "one row may hold" in rejection.reason
    assert parsed.kept == 199


def test_a_csv_record_spanning_lines_past_the_row_limit_is_refused_at_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(limits, "MAX_ROW_BYTES", 1000)
    path = tmp_path / "long.csv"
    cell = "\n".join(["a line of a long quoted answer"] * 50)  # no line is long, the cell is
    path.write_text(f'prompt,response\nHi,Hello\nTell me,"{cell}"\nBye,Goodbye\n')

    with pytest.raises(DatasetParseError) as caught:
        parse_records(file_records(path, path.name), path.name)

    assert caught.value.context == {"filename": "long.csv", "line": "3"}


# --- the preview: the first row, shortened ------------------------------------------------------


def test_the_preview_of_a_long_first_row_is_shortened_and_the_dataset_keeps_it_whole(
    tmp_path: Path, dataprep: Connection
):
    answer = "word " * 20_000
    path = tmp_path / "long.jsonl"
    path.write_text(chat("Write a lot", answer) + "\n")

    info = upload_dataset(dataprep, path)

    preview = json.loads(info.preview_json)
    shown = preview[1]["content"]
    assert len(info.preview_json) < 5_000
    assert shown.startswith("word word") and shown.endswith("(99,000 more characters)")
    store = LocalDirStore(tmp_path / "home" / "artifacts")
    assert datasets.load_sft_rows(store, info.dataset_id) == [messages("Write a lot", answer)]
