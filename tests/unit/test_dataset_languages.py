"""Rows in other languages are removed and listed, with fastText's shipped model (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_dataset_duplicates import chat

from backpropagate.connection import Connection
from backpropagate.workflows import upload_dataset
from backpropagate_api.errors import ConfigError
from backpropagate_api.settings import Settings
from backpropagate_services.common.datasets import load_record, load_sft_rows
from backpropagate_services.common.store.local import LocalDirStore
from backpropagate_services.dataprep.languages import LanguageFilter
from backpropagate_services.stack import start_stack

ENGLISH = chat("Where do penguins live?", "Most penguins live in the southern hemisphere.")
FRENCH = chat("Où vivent les pingouins ?", "La plupart vivent dans l'hémisphère sud.")
GERMAN = chat("Wo leben Pinguine?", "Die meisten Pinguine leben auf der Südhalbkugel.")


def test_a_row_in_another_language_is_removed_saying_which_and_how_sure():
    english_only = LanguageFilter(["en"])

    assert english_only.removal(ENGLISH, 1) is None
    removal = english_only.removal(FRENCH, 2)
    assert removal is not None and (removal.line, removal.code) == (2, "FILTER_LANGUAGE")
    assert removal.reason.startswith("written in fr (") and removal.reason.endswith("not en")
    assert LanguageFilter(["en", "FR"]).removal(FRENCH, 2) is None  # codes in any case


def test_a_row_too_short_to_place_is_kept_and_no_languages_keeps_every_row():
    assert LanguageFilter(["en"]).removal(chat("2+2?", "4"), 1) is None
    assert LanguageFilter([]).removal(GERMAN, 1) is None


def test_a_language_that_is_no_iso_code_is_a_config_error():
    with pytest.raises(ConfigError, match="ISO 639 codes such as en or fr, got 'english'"):
        LanguageFilter(["english"])


def test_an_upload_keeps_the_asked_languages_and_lists_the_rest_before_duplicates(
    tmp_path: Path,
):
    # The French row comes twice: both are language removals, neither a duplicate.
    rows = [
        ENGLISH,
        FRENCH,
        GERMAN,
        FRENCH,
        *(chat(f"Question {n}?", f"Answer {n}.") for n in range(3)),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    home = tmp_path / "home"
    stack = start_stack(Settings(home=home), ["dataprep"], "127.0.0.1:0")
    connection = Connection({"dataprep": stack.address}, False)
    try:
        info = upload_dataset(connection, path, dedup="exact", languages=["en"])
        everything = upload_dataset(connection, path, dedup="exact")
    finally:
        connection.close()
        stack.stop()

    assert [(row.line, row.code) for row in info.removed] == [
        (2, "FILTER_LANGUAGE"),
        (3, "FILTER_LANGUAGE"),
        (4, "FILTER_LANGUAGE"),
    ]
    assert "written in de" in info.removed[1].reason
    store = LocalDirStore(home / "artifacts")
    assert load_sft_rows(store, info.dataset_id)[0] == ENGLISH["messages"]
    assert load_record(store, info.dataset_id).num_examples == 4
    # Without the filter: another preparation, the second French row a duplicate.
    assert everything.dataset_id != info.dataset_id
    assert [(row.line, row.code) for row in everything.removed] == [(4, "FILTER_DUPLICATE")]
