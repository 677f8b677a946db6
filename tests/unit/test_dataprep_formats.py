"""Dataset formats: which format a file is, what its rows become, and how a bad row is reported.

A file is one format (ShareGPT, OpenAI messages or Alpaca) and every row becomes a list of
OpenAI-style messages. Each rejection names the file, the file's own 1-based line and the field,
because that is what a user needs to fix row 7,312 of a big file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backpropagate_api.errors import (
    BackpropagateError,
    DatasetEmptyError,
    DatasetFormatUnknownError,
    DatasetParseError,
    DatasetSchemaError,
)
from backpropagate_services.dataprep.formats import parse_jsonl

FILENAME = "chat.jsonl"

SHAREGPT_ROW = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
    ]
}
OPENAI_ROW = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}
ALPACA_ROW = {"instruction": "Translate to French", "input": "cat", "output": "chat"}


def jsonl(*rows: object) -> list[str]:
    """Lines of a JSONL file as `parse_jsonl` receives them; str rows are taken verbatim."""
    return [row if isinstance(row, str) else json.dumps(row) for row in rows]


def rejection(
    error_class: type[BackpropagateError], lines: list[str], format_hint: str = "auto"
) -> BackpropagateError:
    with pytest.raises(error_class) as caught:
        parse_jsonl(lines, FILENAME, format_hint)
    return caught.value


def assert_points_at(error: BackpropagateError, line: int, field: str | None = None) -> None:
    assert error.context["filename"] == FILENAME
    assert error.context["line"] == str(line)
    assert f"{FILENAME} line {line}" in error.message
    if field is not None:
        assert error.context["field"] == field
        assert f"'{field}'" in error.message


# --- detection and normalisation ---------------------------------------------------------------


def test_sharegpt_file_is_detected_and_speakers_become_openai_roles() -> None:
    parsed = parse_jsonl(jsonl(SHAREGPT_ROW), FILENAME)

    assert parsed.format == "sharegpt"
    assert parsed.conversations == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    ]


def test_sharegpt_accepts_user_and_assistant_as_speakers_too() -> None:
    row = {"conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]}

    parsed = parse_jsonl(jsonl(row), FILENAME)

    assert parsed.conversations == [
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    ]


def test_openai_file_is_detected_and_its_messages_are_kept_as_they_are() -> None:
    parsed = parse_jsonl(jsonl(OPENAI_ROW, OPENAI_ROW), FILENAME)

    assert parsed.format == "openai"
    assert parsed.conversations == [OPENAI_ROW["messages"], OPENAI_ROW["messages"]]


def test_alpaca_row_becomes_user_prompt_with_input_appended_and_assistant_output() -> None:
    parsed = parse_jsonl(jsonl(ALPACA_ROW), FILENAME)

    assert parsed.format == "alpaca"
    assert parsed.conversations == [
        [
            {"role": "user", "content": "Translate to French\n\ncat"},
            {"role": "assistant", "content": "chat"},
        ]
    ]


@pytest.mark.parametrize("row_input", [None, "", "   "], ids=["absent", "empty", "blank"])
def test_alpaca_row_without_input_uses_the_instruction_alone(row_input: str | None) -> None:
    row = {"instruction": "Say hi", "output": "hi"}
    if row_input is not None:
        row["input"] = row_input

    parsed = parse_jsonl(jsonl(row), FILENAME)

    assert parsed.conversations[0][0] == {"role": "user", "content": "Say hi"}


def test_an_alpaca_rows_system_field_becomes_the_system_turn() -> None:
    row = {**ALPACA_ROW, "system": "Answer in one word."}

    parsed = parse_jsonl(jsonl(row, ALPACA_ROW), FILENAME)

    assert parsed.conversations[0][0] == {"role": "system", "content": "Answer in one word."}
    assert [turn["role"] for turn in parsed.conversations[1]] == ["user", "assistant"]


def test_explicit_format_hint_that_matches_the_file_is_accepted() -> None:
    assert parse_jsonl(jsonl(OPENAI_ROW), FILENAME, "openai").format == "openai"


def test_blank_lines_are_skipped_without_becoming_examples() -> None:
    parsed = parse_jsonl(["", *jsonl(OPENAI_ROW), "   ", "\t", *jsonl(OPENAI_ROW)], FILENAME)

    assert len(parsed.conversations) == 2


def test_line_numbers_stay_the_files_own_after_blank_lines() -> None:
    lines = [*jsonl(OPENAI_ROW), "", "  ", "{broken"]

    error = rejection(DatasetParseError, lines)

    assert_points_at(error, line=4)


# --- rows that are not JSON objects ------------------------------------------------------------


def test_invalid_json_is_rejected_with_line_number_and_column() -> None:
    error = rejection(DatasetParseError, jsonl(OPENAI_ROW, '{"messages": [}'))

    assert_points_at(error, line=2)
    assert "invalid JSON" in error.message
    assert "column 15" in error.message
    assert error.code == "INPUT_DATASET_PARSE"
    assert "one complete JSON object" in error.hint


@pytest.mark.parametrize("row", ["[1, 2]", '"text"', "42", "null"])
def test_row_that_is_not_an_object_is_rejected_with_its_type(row: str) -> None:
    error = rejection(DatasetParseError, jsonl(OPENAI_ROW, row))

    assert_points_at(error, line=2)
    assert type(json.loads(row)).__name__ in error.message


def test_json_nested_past_any_row_is_a_parse_error_not_a_crash() -> None:
    error = rejection(DatasetParseError, jsonl(OPENAI_ROW, "[" * 100_000 + "]" * 100_000))

    assert_points_at(error, line=2)
    assert "nested too deeply" in error.message


# --- rows of the right format with a bad field -------------------------------------------------


def test_sharegpt_turn_with_unknown_speaker_is_rejected_with_field_path() -> None:
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]}

    error = rejection(DatasetSchemaError, jsonl(SHAREGPT_ROW, row))

    assert_points_at(error, line=2, field="conversations[1].from")
    assert "'bot'" in error.message


def test_openai_message_with_unknown_role_is_rejected_with_field_path() -> None:
    row = {"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "A"}]}

    error = rejection(DatasetSchemaError, jsonl(row))

    assert_points_at(error, line=1, field="messages[0].role")
    assert "'human'" in error.message


@pytest.mark.parametrize(
    ("row", "field"),
    [
        (
            {"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "A"}]},
            "conversations[0].value",
        ),
        (
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]},
            "messages[1].content",
        ),
        ({"instruction": "", "output": "A"}, "instruction"),
        ({"instruction": "Q", "output": "\n"}, "output"),
    ],
    ids=["sharegpt-value", "openai-content", "alpaca-instruction", "alpaca-output"],
)
def test_empty_text_is_rejected_with_field(row: dict[str, object], field: str) -> None:
    error = rejection(DatasetSchemaError, jsonl(row))

    assert_points_at(error, line=1, field=field)
    assert "is empty" in error.message


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"conversations": [{"value": "Hi"}]}, "conversations[0].from"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ],
    ids=["sharegpt-from", "openai-content"],
)
def test_turn_missing_a_field_is_rejected_with_field(row: dict[str, object], field: str) -> None:
    error = rejection(DatasetSchemaError, jsonl(row))

    assert_points_at(error, line=1, field=field)
    assert "is missing" in error.message


@pytest.mark.parametrize(
    ("row", "field", "found_type"),
    [
        ({"conversations": [{"from": "human", "value": 7}]}, "conversations[0].value", "int"),
        ({"instruction": "Q", "input": None, "output": "A"}, "input", "NoneType"),
    ],
    ids=["sharegpt-value", "alpaca-input"],
)
def test_non_string_text_is_rejected_with_field_and_type(
    row: dict[str, object], field: str, found_type: str
) -> None:
    error = rejection(DatasetSchemaError, jsonl(row))

    assert_points_at(error, line=1, field=field)
    assert f"must be a string, not {found_type}" in error.message


@pytest.mark.parametrize(
    ("row", "field"),
    [({"conversations": []}, "conversations"), ({"messages": "Hi"}, "messages")],
    ids=["empty-list", "not-a-list"],
)
def test_turns_that_are_not_a_non_empty_list_are_rejected(
    row: dict[str, object], field: str
) -> None:
    error = rejection(DatasetSchemaError, jsonl(row))

    assert_points_at(error, line=1, field=field)
    assert "non-empty list" in error.message


def test_turn_that_is_not_an_object_is_rejected_with_its_index() -> None:
    row = {"messages": [{"role": "user", "content": "Hi"}, "Hello!"]}

    error = rejection(DatasetSchemaError, jsonl(row))

    assert_points_at(error, line=1, field="messages[1]")


def test_sharegpt_row_without_assistant_turn_is_rejected_with_line_number() -> None:
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"}]}

    error = rejection(DatasetSchemaError, jsonl(SHAREGPT_ROW, SHAREGPT_ROW, row))

    assert_points_at(error, line=3, field="conversations")
    assert "no assistant turn" in error.message


def test_openai_row_without_assistant_turn_is_rejected_with_line_number() -> None:
    row = {"messages": [{"role": "user", "content": "Hi"}]}

    error = rejection(DatasetSchemaError, jsonl(row))

    assert_points_at(error, line=1, field="messages")
    assert "no assistant turn" in error.message


def test_schema_rejection_carries_the_stable_code_and_the_formats_hint() -> None:
    error = rejection(DatasetSchemaError, jsonl({"messages": [{"role": "user"}]}))

    assert error.code == "INPUT_DATASET_SCHEMA"
    assert error.exit_code == 1
    for shape in ("ShareGPT", "Alpaca", "OpenAI"):
        assert shape in error.hint


# --- the file as a whole -----------------------------------------------------------------------


def test_row_of_another_format_mid_file_is_rejected_naming_both_formats() -> None:
    error = rejection(DatasetSchemaError, jsonl(SHAREGPT_ROW, SHAREGPT_ROW, ALPACA_ROW))

    assert_points_at(error, line=3)
    assert error.context["field"] == "input,instruction,output"
    assert "row is alpaca but the file is sharegpt" in error.message


def test_row_of_no_known_format_mid_file_is_rejected_as_schema_error() -> None:
    error = rejection(DatasetSchemaError, jsonl(OPENAI_ROW, {"prompt": "Q", "completion": "A"}))

    assert_points_at(error, line=2)
    assert error.context["field"] == "completion,prompt"
    assert "of no known format" in error.message


def test_first_row_of_unknown_format_is_rejected_listing_its_keys() -> None:
    error = rejection(DatasetFormatUnknownError, jsonl("", {"prompt": "Q", "completion": "A"}))

    assert_points_at(error, line=2)
    assert "['completion', 'prompt']" in error.message
    assert error.code == "INPUT_DATASET_FORMAT_UNKNOWN"


def test_alpaca_needs_both_instruction_and_output_to_be_recognised() -> None:
    rejection(DatasetFormatUnknownError, jsonl({"instruction": "Q", "input": "x"}))


@pytest.mark.parametrize(
    "lines", [[], [""], ["", "   ", "\t\r"]], ids=["no-lines", "one-blank", "only-blanks"]
)
def test_file_without_rows_is_rejected_as_empty(lines: list[str]) -> None:
    error = rejection(DatasetEmptyError, lines)

    assert error.context == {"filename": FILENAME}
    assert error.code == "INPUT_DATASET_EMPTY"


def test_explicit_format_hint_rejects_a_file_of_another_format_at_its_first_row() -> None:
    error = rejection(DatasetSchemaError, jsonl(SHAREGPT_ROW), format_hint="alpaca")

    assert_points_at(error, line=1, field="conversations")
    assert "row is sharegpt but the file is alpaca" in error.message


def test_unknown_format_hint_is_rejected_before_reading_any_row() -> None:
    error = rejection(DatasetFormatUnknownError, ["{not json"], format_hint="csv")

    assert error.context == {"format": "csv"}
    assert "'csv'" in error.message
    for name in ("sharegpt", "openai", "alpaca", "auto"):
        assert name in error.message


@pytest.mark.parametrize("hint", ["", "auto"])
def test_empty_or_auto_hint_means_detect(hint: str) -> None:
    assert parse_jsonl(jsonl(ALPACA_ROW), FILENAME, hint).format == "alpaca"


# --- ChatML text ---------------------------------------------------------------------------------


def chatml(*turns: tuple[str, str]) -> dict[str, str]:
    return {"text": "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)}


def test_chatml_text_becomes_its_turns_as_messages() -> None:
    row = chatml(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!\nHow are you?"))

    parsed = parse_jsonl(jsonl(row), FILENAME)

    assert parsed.format == "chatml"
    assert parsed.conversations == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!\nHow are you?"},
        ]
    ]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (chatml(("user", "Hi"), ("bot", "Yo")), "turn 2 has unknown role 'bot'"),
        (chatml(("user", "Hi")), "has no assistant turn"),
        ({"text": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHel"}, "unclosed turn"),
    ],
    ids=["unknown role", "no assistant", "unclosed"],
)
def test_a_bad_chatml_row_names_the_text_field_and_what_is_wrong(row, problem) -> None:
    error = rejection(DatasetSchemaError, jsonl(chatml(("user", "a"), ("assistant", "b")), row))

    assert_points_at(error, line=2, field="text")
    assert problem in error.message


def sharegpt(*turns: tuple[str, str]) -> dict[str, object]:
    return {"conversations": [{"from": speaker, "value": text} for speaker, text in turns]}


def messages(*roles: str) -> dict[str, object]:
    return {"messages": [{"role": role, "content": f"{role} says"} for role in roles]}


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        (messages("user", "user", "assistant"), "messages[1].role", "second user turn in a row"),
        (
            messages("user", "assistant", "assistant"),
            "messages[2].role",
            "second assistant turn in a row (a user turn missing before it)",
        ),
        (messages("assistant", "user", "assistant"), "messages[0].role", "answers no user turn"),
        (messages("system", "assistant"), "messages[1].role", "answers no user turn"),
        (
            messages("user", "assistant", "system", "user", "assistant"),
            "messages[2].role",
            "system turn after the first",
        ),
        (
            sharegpt(("human", "a"), ("human", "b"), ("gpt", "c")),
            "conversations[1].from",
            "second user turn in a row (a reply missing before it)",
        ),
        (
            chatml(("user", "a"), ("user", "b"), ("assistant", "c")),
            "text",
            "second user turn in a row (turn 2)",
        ),
    ],
    ids=[
        "two users",
        "two assistants",
        "assistant first",
        "after system",
        "late system",
        "sharegpt",
        "chatml",
    ],
)
def test_turns_out_of_order_are_refused_naming_the_turn(row, field, problem) -> None:
    good = next(
        example
        for example in (OPENAI_ROW, SHAREGPT_ROW, chatml(("user", "a"), ("assistant", "b")))
        if example.keys() == row.keys()
    )
    error = rejection(DatasetSchemaError, jsonl(good, row))

    assert_points_at(error, line=2, field=field)
    assert problem in error.message


def test_a_system_turn_first_and_many_exchanges_in_order_are_kept() -> None:
    row = messages("system", "user", "assistant", "user", "assistant")

    assert parse_jsonl(jsonl(row), FILENAME).conversations == [row["messages"]]


def test_a_text_row_without_chatml_turns_is_a_document_for_completion_training() -> None:
    documents = [{"text": f"Once upon a time, story {number}."} for number in range(10)]
    parsed = parse_jsonl(jsonl(*documents, {"text": "  "}), FILENAME, strict=False)

    assert (parsed.format, parsed.rows) == ("text", documents)
    assert [(row.line, row.field) for row in parsed.rejected] == [(11, "text")]
    assert parsed.conversations == []


def test_a_chatml_row_in_a_text_file_is_named_as_the_odd_one() -> None:
    error = rejection(
        DatasetSchemaError, jsonl({"text": "A story."}, chatml(("user", "a"), ("assistant", "b")))
    )

    assert_points_at(error, line=2, field="text")
    assert "row is chatml but the file is text" in error.message


def test_the_shipped_chatml_example_reads_as_the_quickstarts_conversations() -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    chatml_rows = (examples / "chatml.jsonl").read_text().splitlines()
    sharegpt_rows = (examples / "quickstart.jsonl").read_text().splitlines()

    assert (
        parse_jsonl(chatml_rows, "chatml.jsonl").conversations
        == parse_jsonl(sharegpt_rows, "quickstart.jsonl").conversations
    )


# --- OpenAI content parts ----------------------------------------------------------------------


def parts(*texts: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": text} for text in texts]


def test_openai_content_given_as_text_parts_becomes_their_text_joined_by_newlines() -> None:
    row = {
        "messages": [
            {"role": "system", "content": parts("Be brief.")},
            {"role": "user", "content": parts("Look at this sum:", "what is 2+2?")},
            {"role": "assistant", "content": parts("4")},
        ]
    }

    parsed = parse_jsonl(jsonl(row), FILENAME)

    assert parsed.format == "openai"
    assert parsed.conversations == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Look at this sum:\nwhat is 2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    ]


def test_a_preference_prompt_with_text_parts_becomes_plain_messages() -> None:
    prompt = [{"role": "user", "content": parts("Capital of", "France?")}]
    row = {"prompt": prompt, "chosen": "Paris.", "rejected": "London."}

    [parsed] = parse_jsonl(jsonl(row), FILENAME).preference_rows

    assert parsed["prompt"] == [{"role": "user", "content": "Capital of\nFrance?"}]


@pytest.mark.parametrize(
    ("part", "problem"),
    [
        ({"type": "image_url", "image_url": {"url": "https://x/cat.png"}}, "'image_url'"),
        ({"type": "input_audio", "input_audio": {"data": "..."}}, "'input_audio'"),
    ],
    ids=["image", "audio"],
)
def test_a_content_part_that_is_not_text_is_refused_naming_its_type(part, problem) -> None:
    row = {
        "messages": [
            {"role": "user", "content": [*parts("What is this?"), part]},
            {"role": "assistant", "content": "A cat."},
        ]
    }

    error = rejection(DatasetSchemaError, jsonl(OPENAI_ROW, row))

    assert_points_at(error, line=2, field="messages[0].content[1].type")
    assert problem in error.message and "only text parts train" in error.message


@pytest.mark.parametrize(
    ("content", "field", "problem"),
    [
        ([], "messages[0].content", "must be a string or a non-empty list of content parts"),
        (7, "messages[0].content", "a non-empty list of content parts, not int"),
        (["Hi"], "messages[0].content[0]", "must be an object"),
        ([{"text": "Hi"}], "messages[0].content[0].type", "is missing"),
        ([{"type": "text"}], "messages[0].content[0].text", "is missing"),
        ([{"type": "text", "text": 4}], "messages[0].content[0].text", "must be a string"),
        (parts(" ", "Hi"), "messages[0].content[0].text", "is empty"),
    ],
    ids=["no parts", "a number", "a string part", "no type", "no text", "text a number", "blank"],
)
def test_a_malformed_content_part_is_refused_with_its_field(content, field, problem) -> None:
    row = {"messages": [{"role": "user", "content": content}, OPENAI_ROW["messages"][1]]}

    error = rejection(DatasetSchemaError, jsonl(row))

    assert_points_at(error, line=1, field=field)
    assert problem in error.message


def test_sharegpt_values_stay_strings_only() -> None:
    row = {
        "conversations": [{"from": "human", "value": parts("Hi")}, SHAREGPT_ROW["conversations"][2]]
    }

    error = rejection(DatasetSchemaError, jsonl(row))

    assert_points_at(error, line=1, field="conversations[0].value")
    assert "must be a string, not list" in error.message
