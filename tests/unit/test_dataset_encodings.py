"""Dataset files as editors and tools save them: a byte-order mark, UTF-16, CRLF line ends,
trailing blank lines, characters JSON allows inside a string that Python counts as line breaks.
Each is read as the same rows; a file in another encoding is refused at its line, with a hint."""

from __future__ import annotations

import codecs
import gzip
import json
from pathlib import Path

import pytest

from backpropagate.connection import Connection
from backpropagate.workflows import upload_dataset
from backpropagate_api.errors import DatasetParseError
from backpropagate_api.settings import Settings
from backpropagate_services.common.datasets import chat_rows, load_sft_rows, save_dataset
from backpropagate_services.common.store.local import LocalDirStore
from backpropagate_services.dataprep import limits
from backpropagate_services.dataprep.encoding import text_lines
from backpropagate_services.dataprep.formats import parse_jsonl, parse_records
from backpropagate_services.dataprep.records import file_records
from backpropagate_services.stack import start_stack

ROWS = [
    {"messages": [{"role": "user", "content": "Héllo"}, {"role": "assistant", "content": "Hi ✓"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]
TEXT = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS)


def parsed_conversations(path: Path) -> list[list[dict[str, str]]]:
    return parse_jsonl(text_lines(path, path.name), path.name).conversations


@pytest.mark.parametrize(
    "saved",
    [
        TEXT.encode("utf-8"),
        codecs.BOM_UTF8 + TEXT.encode("utf-8"),
        TEXT.replace("\n", "\r\n").encode("utf-8"),
        (TEXT + "\n\r\n  \n").encode("utf-8"),
        TEXT.replace("\n", "\r\n").encode("utf-16"),  # with its BOM, as Windows writes it
        codecs.BOM_UTF16_BE + TEXT.encode("utf-16-be"),
        TEXT.encode("utf-32"),
    ],
    ids=["utf-8", "utf-8 bom", "crlf", "trailing blanks", "utf-16 le crlf", "utf-16 be", "utf-32"],
)
def test_every_way_an_editor_saves_the_file_reads_as_the_same_rows(tmp_path, saved):
    path = tmp_path / "data.jsonl"
    path.write_bytes(saved)

    assert parsed_conversations(path) == [row["messages"] for row in ROWS]


def test_a_line_in_another_encoding_is_refused_at_that_line_with_a_hint(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(TEXT.encode("utf-8") + '{"messages": "café"}\n'.encode("latin-1"))

    with pytest.raises(DatasetParseError) as caught:
        parsed_conversations(path)

    assert caught.value.code == "INPUT_DATASET_PARSE"
    assert caught.value.context == {"filename": "latin1.jsonl", "line": "3"}
    assert "not valid UTF-8 (invalid continuation byte at byte 17)" in caught.value.message
    assert "UTF-8" in caught.value.hint


def test_a_broken_utf16_file_is_refused_with_a_parse_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(TEXT.encode("utf-16") + b"\x00\xd8")  # a lone high surrogate

    with pytest.raises(DatasetParseError, match="not valid UTF-16"):
        parsed_conversations(path)


def test_line_separators_inside_a_string_stay_in_the_row_through_the_store(tmp_path):
    """U+2028 and U+0085 are valid inside a JSON string; str.splitlines() would cut the row."""
    row = {"messages": [{"role": "user", "content": "a\u2028b\x85c"}, ROWS[0]["messages"][1]]}
    path = tmp_path / "separators.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    store = LocalDirStore(tmp_path / "store")

    conversations = parsed_conversations(path)
    save_dataset(store, "d1", "openai", chat_rows(conversations), path.name, 1)

    assert load_sft_rows(store, "d1") == [row["messages"]]


def test_a_utf16_file_with_crlf_uploads_through_the_dataprep_service(tmp_path):
    path = tmp_path / "excel export.jsonl"
    path.write_bytes(TEXT.replace("\n", "\r\n").encode("utf-16"))
    stack = start_stack(Settings(home=tmp_path / "home"), ["dataprep"], "127.0.0.1:0")
    connection = Connection({"dataprep": stack.address}, False)
    try:
        dataset = upload_dataset(connection, path)
        stored = load_sft_rows(LocalDirStore(tmp_path / "home" / "artifacts"), dataset.dataset_id)
    finally:
        connection.close()
        stack.stop()

    assert (dataset.format, dataset.num_examples) == ("openai", 2)
    assert stored == [row["messages"] for row in ROWS]


# --- pathological files: a stable INPUT_ code with the file and line, never INTERNAL ------------


def refusal(tmp_path: Path, saved: bytes) -> DatasetParseError:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(saved)
    with pytest.raises(DatasetParseError) as caught:
        parsed_conversations(path)
    assert caught.value.code == "INPUT_DATASET_PARSE"
    return caught.value


def test_a_line_past_the_limit_is_refused_at_its_line_without_reading_it_whole(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(limits, "MAX_ROW_BYTES", 1024)
    row = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}
    row["messages"][0]["content"] = "x" * (1024 - len(json.dumps(row)))
    at_limit = json.dumps(row).encode()
    assert len(at_limit) == 1024  # a row of exactly the limit is read; one byte more is not

    error = refusal(tmp_path, TEXT.encode() + at_limit + b"\n" + b"x" * 5000 + b"\n")

    assert error.context == {"filename": "bad.jsonl", "line": "4"}
    assert "longer than" in error.message


@pytest.mark.parametrize(
    ("saved", "line"),
    [
        (TEXT.encode() + b'{"messages": "a\x00b"}\n', 3),  # a raw NUL inside a string
        (b"\x00\x00\x00\x00", 1),  # NULs alone (no byte-order mark)
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", 1),  # an image
    ],
    ids=["nul in a string", "nul bytes", "png"],
)
def test_nul_bytes_and_binary_files_are_refused_at_their_line(tmp_path, saved, line):
    error = refusal(tmp_path, saved)

    assert error.context["line"] == str(line)


def test_a_gzipped_file_reads_as_its_rows_and_its_kind_comes_from_the_name_inside(tmp_path):
    jsonl, csv_file = tmp_path / "data.jsonl.gz", tmp_path / "table.csv.gz"
    jsonl.write_bytes(gzip.compress(codecs.BOM_UTF8 + TEXT.encode("utf-8")))
    csv_file.write_bytes(gzip.compress(b"prompt,response\nHi,Hello\n"))

    assert parsed_conversations(jsonl) == [row["messages"] for row in ROWS]
    table = list(file_records(csv_file, csv_file.name))
    assert table == [(2, {"instruction": "Hi", "output": "Hello"})]


@pytest.mark.parametrize(
    ("saved", "problem"),
    [
        (gzip.compress(TEXT.encode())[:40], "the gzip compression is damaged"),
        (b"PK\x03\x04" + bytes(60), "a ZIP archive, not a dataset file"),
    ],
    ids=["cut gzip", "zip"],
)
def test_a_damaged_gzip_or_a_zip_archive_is_refused_saying_what_it_is(tmp_path, saved, problem):
    path = tmp_path / "data.jsonl"
    path.write_bytes(saved)

    with pytest.raises(DatasetParseError, match=problem):
        parsed_conversations(path)


# A JSON \u escape may name half of a surrogate pair alone: valid JSON, not valid Unicode.
LONE_SURROGATE = '{"messages": [{"role": "user", "content": "bad \\ud800 text"}, ' + (
    '{"role": "assistant", "content": "ok"}]}\n'
)


def test_a_lone_surrogate_escape_is_a_parse_error_at_its_line_and_field(tmp_path):
    error = refusal(tmp_path, TEXT.encode() + LONE_SURROGATE.encode())

    assert error.context == {
        "filename": "bad.jsonl",
        "line": "3",
        "field": "messages[0].content",
    }
    assert "not valid Unicode (a lone surrogate \\ud800 at character 5)" in error.message
    assert "surrogate" in error.hint


@pytest.mark.parametrize(
    ("row", "field_start"),
    [
        ('{"text": "fine", "' + "k" * 5000 + '\\ud800": 1}\n', "kkkk"),
        ('{"text": ' + "[" * 500 + '"\\udfff"' + "]" * 500 + "}\n", "text[0][0]"),
    ],
    ids=["in a long key", "nested deep"],
)
def test_a_lone_surrogate_anywhere_in_a_row_is_named_in_a_message_of_bounded_size(
    tmp_path, row, field_start
):
    error = refusal(tmp_path, row.encode())

    assert error.context["line"] == "1" and error.context["field"].startswith(field_start)
    assert len(error.message) < 300 and error.context["field"].endswith("...")


DOCUMENTS = '{"text": "A first document."}\n{"text": "A second one."}\n'


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        (TEXT, LONE_SURROGATE),
        (DOCUMENTS, '{"text": "a lone low half \\udc80"}\n'),
        (TEXT, '{"\\ud800": "a key of no known format"}\n'),
    ],
    ids=["in a message", "in a document", "in a key"],
)
def test_a_lone_surrogate_uploads_as_a_parse_error_never_internal(tmp_path, good, bad):
    path = tmp_path / "surrogate.jsonl"
    path.write_text(good * 5 + bad, encoding="utf-8")  # 10 good rows, then line 11
    stack = start_stack(Settings(home=tmp_path / "home"), ["dataprep"], "127.0.0.1:0")
    connection = Connection({"dataprep": stack.address}, False)
    try:
        with pytest.raises(DatasetParseError) as strict:
            upload_dataset(connection, path, strict=True)
        lenient = upload_dataset(connection, path)
    finally:
        connection.close()
        stack.stop()

    assert (strict.value.code, strict.value.context["line"]) == ("INPUT_DATASET_PARSE", "11")
    [rejection] = lenient.rejections
    assert (rejection.line, rejection.code) == (11, "INPUT_DATASET_PARSE")
    assert lenient.num_examples == 10


def test_a_parquet_text_cell_that_is_not_utf8_is_that_rows_parse_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = [f"Document {n}.".encode() for n in range(12)]
    cells[4] = b"bad \xff\xfe bytes"  # Arrow does not check what a writer put in a string column
    path = tmp_path / "table.parquet"
    pq.write_table(pa.table({"text": pa.array(cells, pa.binary()).view(pa.string())}), path)

    parsed = parse_records(file_records(path, path.name), path.name, strict=False)

    [rejection] = parsed.rejected
    assert (rejection.line, rejection.code) == (5, "INPUT_DATASET_PARSE")
    assert "not valid UTF-8 (invalid start byte in a text cell)" in rejection.reason
    assert parsed.kept == 11
