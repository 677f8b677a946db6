"""Repeated rows: removed on request (`--dedup exact|near`) and listed with the kept row they
repeat, never counted as invalid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli_errors import backprop

from backpropagate.connection import Connection
from backpropagate.workflows import upload_dataset
from backpropagate_api.errors import ConfigError
from backpropagate_api.settings import Settings
from backpropagate_services.common.datasets import load_record, load_sft_rows
from backpropagate_services.common.store.local import LocalDirStore
from backpropagate_services.dataprep.duplicates import DuplicateFilter
from backpropagate_services.stack import start_stack

STORY = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, lit the great "
    "lamp, and watched the ships pass safely through the narrow channel below the cliffs. In "
    "winter the storms came in from the north, and he kept a log of every vessel, its flag, its "
    "cargo and the hour it passed, in a leather book his grandfather had started."
)


def chat(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def duplicates_of(mode: str, rows: list[dict]) -> list[int | None]:
    duplicates = DuplicateFilter(mode)
    return [duplicates.duplicate_of(row, line) for line, row in enumerate(rows, start=1)]


def test_exact_finds_the_same_text_whatever_its_case_and_spacing():
    rows = [chat("Hi", "Hello there"), chat("hi ", "hello   THERE"), chat("Hi", "Hello, there")]

    assert duplicates_of("exact", rows) == [None, 1, None]  # punctuation is text


def test_near_finds_a_lightly_edited_copy_and_keeps_different_rows():
    edited = STORY.replace("every evening", "each evening")
    other = "A recipe: whisk two eggs with milk, pour into a hot pan, and fold when just set."
    rows = [chat("Tell a story", STORY), chat("Tell a story", edited), chat("Cook", other)]

    assert duplicates_of("near", rows) == [None, 1, None]
    assert duplicates_of("exact", rows) == [None, None, None]


def test_none_removes_nothing_and_a_bad_mode_is_a_config_error():
    assert duplicates_of("none", [chat("a", "b")] * 3) == [None, None, None]
    with pytest.raises(ConfigError, match="dedup must be one of none, exact, near"):
        DuplicateFilter("fuzzy")


def test_an_upload_with_dedup_stores_each_row_once_and_lists_the_removed(tmp_path: Path):
    rows = [
        chat("Q1", "A1"),
        chat("Q2", "A2"),
        chat("q1", "a1"),
        chat("Q3", "A3"),
        chat("Q2", "A2"),
    ]
    path = tmp_path / "repeats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    stack = start_stack(Settings(home=tmp_path / "home"), ["dataprep"], "127.0.0.1:0")
    connection = Connection({"dataprep": stack.address}, False)
    try:
        info = upload_dataset(connection, path, dedup="exact")
    finally:
        connection.close()
        stack.stop()

    assert (info.num_examples, info.rows_read, list(info.rejections)) == (3, 5, [])
    assert [(r.line, r.code, r.reason) for r in info.removed] == [
        (3, "FILTER_DUPLICATE", "the same text as line 1"),
        (5, "FILTER_DUPLICATE", "the same text as line 2"),
    ]
    store = LocalDirStore(tmp_path / "home" / "artifacts")
    assert load_sft_rows(store, info.dataset_id) == [
        rows[0]["messages"],
        rows[1]["messages"],
        rows[3]["messages"],
    ]
    assert len(load_record(store, info.dataset_id).removed) == 2


@pytest.mark.model
def test_backprop_data_inspect_shows_the_dataset_and_prints_it_as_json(
    tmp_path: Path, model_cache: Path
):
    rows = [chat(f"Q{n}", f"A{n}") for n in range(12)] + [chat("Q1", "A1"), {"messages": []}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    cache = {"BACKPROPAGATE_MODEL_CACHE": str(model_cache)}
    shown = backprop(tmp_path, "data", "inspect", str(path), "--dedup", "exact", env=cache)
    as_json = backprop(
        tmp_path, "data", "inspect", str(path), "--dedup", "exact", "--json", env=cache
    )

    assert shown.exit_code == 0, shown.stderr
    for text in ("openai", "12 of 14 rows", "1 invalid, 1 duplicates", "line 13: the same text"):
        assert text in shown.stdout, text
    record = json.loads(as_json.stdout)
    assert (record["format"], record["num_examples"], record["rows_read"]) == ("openai", "12", "14")
    assert record["rejections"][0]["line"] == "14" and record["removed"][0]["line"] == "13"


def test_backprop_data_prepare_stores_once_and_finds_it_prepared_the_second_time(tmp_path: Path):
    rows = [chat(f"Q{n}", f"A{n}") for n in range(10)] + [chat("Q1", "A1"), {"messages": []}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    first = backprop(tmp_path, "data", "prepare", str(path), "--dedup", "exact", "--json")
    again = backprop(tmp_path, "data", "prepare", str(path), "--dedup", "exact")
    strict = backprop(tmp_path, "data", "prepare", str(path), "--strict")

    assert first.exit_code == 0, first.stderr
    record = json.loads(first.stdout)
    assert (record["num_examples"], len(record["removed"]), "reused" in record) == ("10", 1, False)
    assert again.exit_code == 0 and "(prepared before)" in again.stdout
    assert record["dataset_id"][:12] in again.stdout
    assert strict.exit_code == 1 and "INPUT_DATASET_SCHEMA" in strict.stderr
