"""Lenient validation with a ceiling: bad rows are left out and listed (line, field, reason),
up to 10% of the rows; above that, or with --strict at the first bad row, the upload fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from backpropagate import Trainer
from backpropagate.connection import Connection
from backpropagate.workflows import upload_dataset
from backpropagate_api.errors import (
    DatasetFormatUnknownError,
    DatasetSchemaError,
    DatasetTooLargeError,
    DatasetValidationError,
)
from backpropagate_api.settings import Settings
from backpropagate_services.common.datasets import load_record, load_sft_rows
from backpropagate_services.common.store.local import LocalDirStore
from backpropagate_services.dataprep.formats import parse_jsonl
from backpropagate_services.stack import start_stack

FILENAME = "mixed.jsonl"


def good(n: int) -> str:
    row = {
        "messages": [{"role": "user", "content": f"Q{n}"}, {"role": "assistant", "content": "A"}]
    }
    return json.dumps(row)


NO_ASSISTANT = json.dumps({"messages": [{"role": "user", "content": "Hi"}]})


def lenient(lines: list[str]):
    return parse_jsonl(lines, FILENAME, strict=False)


def test_a_bad_row_is_left_out_and_listed_with_its_line_code_field_and_reason():
    lines = [good(n) for n in range(18)] + ["{broken", "", NO_ASSISTANT]

    parsed = lenient(lines)

    assert len(parsed.conversations) == 18 and parsed.rows_read == 20
    broken, missing = parsed.rejected
    assert (broken.line, broken.code, broken.field) == (19, "INPUT_DATASET_PARSE", "")
    assert broken.reason.startswith("invalid JSON")
    assert (missing.line, missing.code) == (21, "INPUT_DATASET_SCHEMA")
    assert "assistant" in missing.reason


def test_the_format_comes_from_the_first_good_row_when_the_first_is_bad():
    parsed = lenient(["[1, 2]", *(good(n) for n in range(10))])

    assert parsed.format == "openai" and [r.line for r in parsed.rejected] == [1]


def test_a_tenth_of_the_rows_bad_is_accepted_more_fails_with_the_list():
    assert len(lenient([*(good(n) for n in range(9)), "{"]).rejected) == 1  # 1 of 10

    with pytest.raises(DatasetValidationError) as caught:
        lenient([*(good(n) for n in range(8)), "{", NO_ASSISTANT])  # 2 of 10

    error = caught.value
    assert error.code == "INPUT_DATASET_VALIDATION"
    assert error.context == {"filename": FILENAME, "rows_read": "10", "rows_rejected": "2"}
    assert "2 of 10 rows are invalid" in error.message
    assert "line 9: invalid JSON" in error.message and "line 10: " in error.message


def test_the_failure_lists_the_first_20_bad_rows_and_counts_the_rest():
    with pytest.raises(DatasetValidationError) as caught:
        lenient([good(0), *["{"] * 25])

    assert "line 21: invalid JSON" in caught.value.message
    assert "line 22:" not in caught.value.message
    assert "... and 5 more" in caught.value.message


def test_a_file_with_no_good_row_fails_with_its_first_rows_own_error():
    with pytest.raises(DatasetFormatUnknownError, match="line 1: cannot tell the format"):
        lenient([json.dumps({"question": "Q", "answer": "A"})] * 3)


def test_strict_fails_at_the_first_bad_row():
    with pytest.raises(DatasetSchemaError, match=f"{FILENAME} line 3"):
        parse_jsonl([good(0), good(1), NO_ASSISTANT, *(good(n) for n in range(20))], FILENAME)


# --- through the dataprep service ----------------------------------------------------------------


@pytest.fixture
def dataprep(tmp_path: Path):
    stack = start_stack(Settings(home=tmp_path / "home"), ["dataprep"], "127.0.0.1:0")
    connection = Connection({"dataprep": stack.address}, False)
    try:
        yield connection
    finally:
        connection.close()
        stack.stop()


def mixed_file(tmp_path: Path) -> Path:
    path = tmp_path / FILENAME
    path.write_text("\n".join([*(good(n) for n in range(12)), NO_ASSISTANT]) + "\n")
    return path


def test_an_upload_keeps_the_good_rows_and_answers_with_the_left_out_ones(dataprep, tmp_path):
    dataset = upload_dataset(dataprep, mixed_file(tmp_path))

    assert (dataset.num_examples, dataset.rows_read) == (12, 13)
    [rejection] = dataset.rejections
    assert (rejection.line, rejection.code) == (13, "INPUT_DATASET_SCHEMA")
    store = LocalDirStore(tmp_path / "home" / "artifacts")
    assert len(load_sft_rows(store, dataset.dataset_id)) == 12
    assert load_record(store, dataset.dataset_id).rejections[0].line == 13  # kept in the record


def test_a_strict_upload_fails_with_the_rows_own_code(dataprep, tmp_path):
    with pytest.raises(DatasetSchemaError, match="line 13"):
        upload_dataset(dataprep, mixed_file(tmp_path), strict=True)


def test_the_sdk_prints_the_rows_it_left_out(tmp_path, dataprep):
    console = Console(record=True, width=200)
    trainer = Trainer(progress=False)
    trainer.console = console

    trainer._show_dataset(upload_dataset(dataprep, mixed_file(tmp_path)))

    text = console.export_text()
    assert "1 of 13 rows left out" in text and "line 13: " in text


def test_an_upload_past_the_size_limit_fails_with_its_code_and_stores_nothing(tmp_path):
    settings = Settings(home=tmp_path / "home", dataprep={"max_upload_bytes": 1000})
    stack = start_stack(settings, ["dataprep"], "127.0.0.1:0")
    connection = Connection({"dataprep": stack.address}, False)
    path = tmp_path / "big.jsonl"
    path.write_text("".join(good(n) + "\n" for n in range(100)))  # about 8 KB
    try:
        with pytest.raises(DatasetTooLargeError) as caught:
            upload_dataset(connection, path)
    finally:
        connection.close()
        stack.stop()

    assert caught.value.code == "INPUT_DATASET_TOO_LARGE"
    assert caught.value.context == {"filename": "big.jsonl", "limit": "1000"}
    assert "MAX_UPLOAD_BYTES" in caught.value.hint
    assert not list((tmp_path / "home").rglob("data.jsonl"))
