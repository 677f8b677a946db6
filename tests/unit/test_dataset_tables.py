"""Tables as datasets: CSV and TSV (prompt/response or Alpaca columns, `--columns` for others),
Parquet (by name or by its magic bytes), each row reported at its own line or row."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backpropagate.connection import Connection
from backpropagate.data_cli import column_mapping
from backpropagate.workflows import upload_dataset
from backpropagate_api.errors import (
    ConfigError,
    DatasetFormatUnknownError,
    DatasetParseError,
    DatasetSchemaError,
)
from backpropagate_api.settings import Settings
from backpropagate_services.dataprep.formats import parse_records
from backpropagate_services.dataprep.records import file_records
from backpropagate_services.stack import start_stack

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
QUICKSTART = [json.loads(line) for line in (EXAMPLES / "quickstart.jsonl").open()]


def first_turns() -> list[list[dict[str, str]]]:
    """The quickstart's first question and answer of each conversation, as the tables hold."""
    speakers = {"human": "user", "gpt": "assistant"}
    return [
        [{"role": speakers[t["from"]], "content": t["value"]} for t in row["conversations"][:2]]
        for row in QUICKSTART
    ]


def parsed(path: Path, columns: dict[str, str] | None = None, strict: bool = True):
    return parse_records(file_records(path, path.name, columns), path.name, strict=strict)


@pytest.mark.parametrize(
    ("name", "source_format"),
    [("prompt_response.csv", "alpaca"), ("alpaca.tsv", "alpaca")],
)
def test_the_shipped_tables_read_as_the_quickstarts_first_turns(name, source_format):
    dataset = parsed(EXAMPLES / name)

    assert dataset.format == source_format
    assert dataset.conversations == first_turns()


def test_the_shipped_parquet_holds_the_quickstarts_whole_conversations():
    dataset = parsed(EXAMPLES / "messages.parquet")

    assert dataset.format == "openai" and len(dataset.conversations) == len(QUICKSTART)
    assert dataset.conversations[:1] == [first_turns()[0]]
    assert len(dataset.conversations[1]) == len(QUICKSTART[1]["conversations"])


def test_a_parquet_file_is_known_by_its_bytes_whatever_its_name(tmp_path):
    renamed = tmp_path / "exported.data"
    renamed.write_bytes((EXAMPLES / "messages.parquet").read_bytes())

    assert parsed(renamed).format == "openai"


def test_other_column_names_are_mapped_with_columns(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\nWhat is 2+2?,"4, of course"\n')

    dataset = parsed(path, {"question": "instruction", "answer": "output"})

    assert dataset.conversations == [
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4, of course"},
        ]
    ]
    with pytest.raises(DatasetFormatUnknownError, match="cannot tell the format from keys"):
        parsed(path)  # without the mapping, nothing says which column is the answer


def test_a_quoted_cell_spanning_lines_is_one_row_and_the_next_row_keeps_its_own_line(tmp_path):
    path = tmp_path / "multi.csv"
    more = "".join(f"Q{n},A{n}\n" for n in range(9))
    path.write_text(f'prompt,response\n"Write two lines","one\ntwo"\nHi,\n{more}')

    with pytest.raises(DatasetSchemaError) as caught:
        parsed(path)  # strict: the second record, on line 4, has an empty response

    assert caught.value.context == {"filename": "multi.csv", "line": "4", "field": "output"}
    lenient = parsed(path, strict=False)
    assert lenient.conversations[0][1]["content"] == "one\ntwo"
    assert [r.line for r in lenient.rejected] == [4]
    assert len(lenient.conversations) == 10


def test_a_row_with_more_cells_than_the_header_is_that_rows_error(tmp_path):
    path = tmp_path / "extra.tsv"
    rows = "".join(f"Q{n}\tA{n}\n" for n in range(12))
    path.write_text(f"prompt\tresponse\n{rows}Q\tA\textra\n")

    dataset = parsed(path, strict=False)

    assert len(dataset.conversations) == 12
    [rejection] = dataset.rejected
    assert (rejection.line, rejection.code) == (14, "INPUT_DATASET_PARSE")
    assert "3 cells, but the header names 2 columns" in rejection.reason


def test_a_kto_table_takes_its_labels_as_words(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\nHi,Hello!,true\nHi,Go away.,False\nHi,Yo,0\n")

    rows = parsed(path).preference_rows

    assert [row["label"] for row in rows] == [True, False, False]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Hi"}]


def test_a_file_named_parquet_that_is_not_one_is_a_parse_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 and then not parquet at all")

    with pytest.raises(DatasetParseError, match="not a readable Parquet file"):
        parsed(path)


def test_columns_option_parses_pairs_and_refuses_anything_else():
    assert column_mapping("question=instruction, answer = output") == {
        "question": "instruction",
        "answer": "output",
    }
    assert column_mapping("") == {}
    with pytest.raises(ConfigError, match="COLUMN=FIELD"):
        column_mapping("question")


def test_tables_upload_through_the_dataprep_service(tmp_path):
    stack = start_stack(Settings(home=tmp_path / "home"), ["dataprep"], "127.0.0.1:0")
    connection = Connection({"dataprep": stack.address}, False)
    table = tmp_path / "qa.tsv"
    pq.write_table(pa.table({"question": ["Q1", "Q2"], "answer": ["A1", "A2"]}), table)
    try:
        csv_info = upload_dataset(connection, EXAMPLES / "prompt_response.csv")
        parquet_info = upload_dataset(
            connection, table, columns={"question": "instruction", "answer": "output"}
        )
    finally:
        connection.close()
        stack.stop()

    assert (csv_info.format, csv_info.num_examples) == ("alpaca", 10)
    assert (parquet_info.format, parquet_info.num_examples) == ("alpaca", 2)
