"""Preference data: the two JSONL shapes, how their rows are stored, and which methods take them.

A pair {"prompt", "chosen", "rejected"} or a labelled answer {"prompt", "completion", "label"}
becomes the same keys with every text a list of OpenAI-style messages, so the trainer reads one
shape. A bad row is reported with the file, its line and the field, as a chat row is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backpropagate_api.errors import (
    ConfigError,
    DatasetSchemaError,
)
from backpropagate_services.common.datasets import (
    chat_rows,
    check_method_fits,
    load_preference_rows,
    load_record,
    load_sft_rows,
    save_dataset,
)
from backpropagate_services.common.store.local import LocalDirStore
from backpropagate_services.dataprep.encoding import text_lines
from backpropagate_services.dataprep.formats import parse_jsonl

FILENAME = "prefs.jsonl"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

PAIR = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "London."}
LABELLED = {"prompt": "Capital of France?", "completion": "Paris.", "label": True}


def jsonl(*rows: object) -> list[str]:
    return [json.dumps(row) for row in rows]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def schema_error(*rows: object) -> DatasetSchemaError:
    with pytest.raises(DatasetSchemaError) as caught:
        parse_jsonl(jsonl(*rows), FILENAME)
    return caught.value


def assert_points_at(error: DatasetSchemaError, line: int, field: str) -> None:
    assert error.context == {"filename": FILENAME, "line": str(line), "field": field}
    assert error.message.startswith(f"{FILENAME} line {line}: field '{field}'")


# --- accepted shapes ---------------------------------------------------------------------------


def test_a_pair_of_strings_becomes_a_user_prompt_and_assistant_answers() -> None:
    parsed = parse_jsonl(jsonl(PAIR), FILENAME)

    assert parsed.format == "preference"
    assert parsed.conversations == []
    assert parsed.preference_rows == [
        {
            "prompt": [user("Capital of France?")],
            "chosen": [assistant("Paris.")],
            "rejected": [assistant("London.")],
        }
    ]


def test_a_pair_of_message_lists_keeps_its_system_prompt_and_earlier_turns() -> None:
    prompt = [
        {"role": "system", "content": "Be brief."},
        user("Hi"),
        assistant("Hello!"),
        user("?"),
    ]
    row = {"prompt": prompt, "chosen": [assistant("Yes.")], "rejected": "No."}

    parsed = parse_jsonl(jsonl(row), FILENAME, "preference")

    assert parsed.preference_rows == [
        {"prompt": prompt, "chosen": [assistant("Yes.")], "rejected": [assistant("No.")]}
    ]


def test_labelled_answers_are_the_kto_format_and_keep_their_boolean_label() -> None:
    bad = {"prompt": [user("Capital of France?")], "completion": "London.", "label": False}

    parsed = parse_jsonl(jsonl(LABELLED, bad), FILENAME)

    assert parsed.format == "kto"
    assert parsed.preference_rows == [
        {
            "prompt": [user("Capital of France?")],
            "completion": [assistant("Paris.")],
            "label": True,
        },
        {
            "prompt": [user("Capital of France?")],
            "completion": [assistant("London.")],
            "label": False,
        },
    ]


@pytest.mark.parametrize(("name", "format_name"), [("preference", "preference"), ("kto", "kto")])
def test_the_shipped_examples_parse_as_their_format(name: str, format_name: str) -> None:
    path = EXAMPLES / f"{name}.jsonl"

    parsed = parse_jsonl(text_lines(path, path.name), path.name)

    assert parsed.format == format_name
    assert len(parsed.preference_rows) >= 10
    if format_name == "kto":
        assert {row["label"] for row in parsed.preference_rows} == {True, False}


# --- rejected rows: file, line, field ----------------------------------------------------------


def test_a_pair_without_its_rejected_answer_is_rejected_with_line_and_field() -> None:
    error = schema_error(PAIR, {"prompt": "Q", "chosen": "A"})

    assert_points_at(error, 2, "rejected")
    assert "is missing" in error.message
    assert error.hint.startswith('Every row is {"prompt", "chosen", "rejected"}')


def test_an_answer_spoken_by_the_user_is_rejected_naming_the_turn() -> None:
    error = schema_error({**PAIR, "chosen": [user("Paris.")]})

    assert_points_at(error, 1, "chosen[0].role")
    assert "'user'" in error.message


def test_a_prompt_that_does_not_end_with_a_user_turn_is_rejected() -> None:
    error = schema_error({**PAIR, "prompt": [user("Hi"), assistant("Hello")]})

    assert_points_at(error, 1, "prompt[1].role")


def test_identical_chosen_and_rejected_answers_are_rejected_as_no_preference() -> None:
    error = schema_error({**PAIR, "rejected": [assistant("Paris.")]})

    assert_points_at(error, 1, "rejected")
    assert "no preference" in error.message


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({**PAIR, "prompt": " "}, "prompt", "is empty"),
        ({**PAIR, "prompt": 3}, "prompt", "must be a string or a non-empty list of messages"),
        ({**PAIR, "chosen": []}, "chosen", "must be a non-empty list"),
        ({**PAIR, "rejected": [{"role": "assistant"}]}, "rejected[0].content", "is missing"),
        ({**LABELLED, "label": "yes"}, "label", "must be true or false, not str"),
        ({**LABELLED, "label": 1}, "label", "must be true or false, not int"),
        ({"prompt": "Q", "label": True}, "completion", "is missing"),
    ],
    ids=[
        "blank-prompt",
        "number-prompt",
        "empty-answer",
        "no-content",
        "label-str",
        "label-int",
        "no-completion",
    ],
)
def test_bad_preference_fields_are_named_with_their_problem(
    row: dict[str, object], field: str, problem: str
) -> None:
    error = schema_error(row)

    assert_points_at(error, 1, field)
    assert problem in error.message
    assert error.hint.startswith("Every row is {")  # the shape of this format, not chat's


def test_a_chat_row_in_a_preference_file_is_rejected_with_its_line() -> None:
    chat = {"messages": [user("Hi"), assistant("Hello")]}

    error = schema_error(PAIR, PAIR, chat)

    assert error.context["line"] == "3"
    assert "row is openai but the file is preference" in error.message


# --- the store contract, and the methods each kind of data serves ------------------------------


def test_preference_rows_are_stored_as_parsed_and_read_back_for_a_preference_method(
    tmp_path: Path,
) -> None:
    store = LocalDirStore(tmp_path)
    rows = parse_jsonl(jsonl(PAIR, {**PAIR, "chosen": "Paris!"}), FILENAME).preference_rows

    record = save_dataset(store, "d1", "preference", rows, FILENAME, 123)

    assert (record.num_examples, record.num_turns, record.preview) == (2, 6, rows[0])
    assert load_record(store, "d1") == record
    assert load_preference_rows(store, "d1", "dpo") == rows
    assert load_preference_rows(store, "d1", "kto") == rows  # trl splits each pair in two


def test_preference_data_read_as_conversations_fails_naming_the_methods_that_fit(
    tmp_path: Path,
) -> None:
    store = LocalDirStore(tmp_path)
    save_dataset(store, "d1", "preference", [json.loads(json.dumps(PAIR))], FILENAME, 1)

    with pytest.raises(ConfigError) as caught:
        load_sft_rows(store, "d1")

    assert caught.value.context["fields"] == "method"
    assert "method sft cannot train on it" in caught.value.message
    assert "--method dpo or orpo or simpo or kto" in caught.value.hint


def test_chat_data_for_a_preference_method_fails_asking_for_pairs(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    save_dataset(store, "c1", "openai", chat_rows([[user("Hi"), assistant("Hello")]]), "c.jsonl", 1)

    with pytest.raises(ConfigError) as caught:
        load_preference_rows(store, "c1", "dpo")

    assert "Dataset c1 (openai) holds chat conversations" in caught.value.message
    assert "--method sft" in caught.value.hint
    assert '{"prompt", "chosen", "rejected"}' in caught.value.hint
    assert load_sft_rows(store, "c1") == [[user("Hi"), assistant("Hello")]]


@pytest.mark.parametrize(
    ("method", "dataset_format", "fits"),
    [
        ("sft", "sharegpt", True),
        ("dpo", "preference", True),
        ("simpo", "preference", True),
        ("kto", "preference", True),
        ("kto", "kto", True),
        ("orpo", "kto", False),
        ("sft", "kto", False),
        ("kto", "alpaca", False),
    ],
)
def test_which_methods_train_on_which_data(method: str, dataset_format: str, fits: bool) -> None:
    if fits:
        check_method_fits(method, dataset_format)
    else:
        with pytest.raises(ConfigError, match=f"method {method} cannot train on it"):
            check_method_fits(method, dataset_format)
