"""The installed `backprop` command reports a user's mistake as one stable code, a hint and exit
status 1: never a Python traceback.

Each command runs the real console script in a fresh process with its own BACKPROPAGATE_HOME and
an empty working directory, so no developer `.env` or endpoint applies (tests/cli_process.py).
The bad-dataset case talks to a real dataprep service in this test process instead, so its error
crosses a process boundary on its way to the user.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_process import Outcome, backprop

from backpropagate import cli
from backpropagate_api.errors import EXIT_RUNTIME_ERROR
from backpropagate_api.settings import SafetySettings, Settings
from backpropagate_services.stack import RunningStack, start_stack


def assert_user_error(outcome: Outcome, code: str) -> None:
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.exit_code == 1, outcome.stderr
    assert f"error {code}:" in outcome.stderr
    assert "hint:" in outcome.stderr


@pytest.fixture(scope="module")
def dataprep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    settings = Settings(
        home=tmp_path_factory.mktemp("dataprep"), safety=SafetySettings(source="host")
    )
    stack = start_stack(settings, ["dataprep"], "127.0.0.1:0")
    try:
        yield stack
    finally:
        stack.stop(grace=0)


def test_help_lists_every_command(tmp_path: Path) -> None:
    outcome = backprop(tmp_path, "--help")

    assert outcome.exit_code == 0, outcome.stderr
    for command in ("train", "export", "runs", "info", "serve", "chat", "demo"):
        assert f" {command} " in outcome.stdout, command


def test_training_on_a_missing_file_is_a_user_error_before_any_stack_starts(
    tmp_path: Path,
) -> None:
    outcome = backprop(tmp_path, "train", "--data", "missing.jsonl")

    assert_user_error(outcome, "INPUT_NOT_FOUND")
    assert "Dataset file not found: missing.jsonl" in outcome.stderr
    assert "hint: Pass the path of a JSONL file" in outcome.stderr
    assert not (tmp_path / "state").exists()  # the embedded stack would have made its store


def test_training_on_a_file_with_a_bad_row_names_the_code_and_line(
    tmp_path: Path, dataprep: RunningStack
) -> None:
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    without_answer = {"messages": [{"role": "user", "content": "Q only"}]}
    (tmp_path / "bad.jsonl").write_text(f"{json.dumps(good)}\n{json.dumps(without_answer)}\n")

    lenient = backprop(tmp_path, "train", "--data", "bad.jsonl", endpoint=dataprep.address)
    strict = backprop(
        tmp_path, "train", "--data", "bad.jsonl", "--strict", endpoint=dataprep.address
    )

    # Half the rows bad is past the 10% a run leaves out: the upload fails with the list.
    assert_user_error(lenient, "INPUT_DATASET_VALIDATION")
    assert "bad.jsonl: 1 of 2 rows are invalid" in lenient.stderr
    assert "line 2: field 'messages' has no assistant turn" in lenient.stderr
    assert_user_error(strict, "INPUT_DATASET_SCHEMA")
    assert "bad.jsonl line 2: field 'messages' has no assistant turn" in strict.stderr
    assert "hint: Rows must all be one format" in strict.stderr


def test_showing_an_unknown_run_is_not_found(tmp_path: Path) -> None:
    outcome = backprop(tmp_path, "runs", "show", "run-does-not-exist")

    assert_user_error(outcome, "INPUT_NOT_FOUND")
    assert "No run id contains 'run-does-not-exist'" in outcome.stderr


def test_a_damaged_queue_file_is_one_error_that_says_which_file_to_move_aside(
    tmp_path: Path,
) -> None:
    queue_file = tmp_path / "state" / "queue.sqlite3"
    queue_file.parent.mkdir()
    queue_file.write_bytes(b"a file that was never a queue\n" * 200)

    # A command that queues or changes a job opens the queue; reading records does not.
    outcome = backprop(tmp_path, "runs", "cancel", "run-20260101T000000-abcdef")

    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.exit_code == EXIT_RUNTIME_ERROR, outcome.stderr
    assert f"error STATE_QUEUE_CORRUPT: The queue database {queue_file} is damaged" in (
        outcome.stderr
    )
    assert f"hint: Move {queue_file} aside" in outcome.stderr


def test_a_directory_that_is_no_saved_dataset_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").mkdir()

    outcome = backprop(tmp_path, "data", "inspect", "data.jsonl")

    assert_user_error(outcome, "INPUT_CONFIG_INVALID")
    assert "data.jsonl is a directory, but not a dataset saved with save_to_disk" in outcome.stderr


def test_a_bug_is_one_message_with_the_internal_code_and_no_traceback(monkeypatch, capsys):
    def broken(**_: object) -> None:
        raise KeyError("[never] shown as markup")

    monkeypatch.setattr(cli, "app", broken)
    monkeypatch.delenv("BACKPROPAGATE_DEBUG", raising=False)

    with pytest.raises(SystemExit) as exited:
        cli.main()

    stderr = capsys.readouterr().err
    assert exited.value.code == EXIT_RUNTIME_ERROR
    assert "error INTERNAL: KeyError: '[never] shown as markup'" in stderr
    assert "--verbose shows the traceback" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize(
    "args",
    [
        ("train", "--no-such-option"),  # an unknown option
        ("export",),  # a missing argument
        ("train", "--lora-r", "many"),  # a value of the wrong type
    ],
)
def test_a_usage_error_exits_1_as_a_user_error_with_the_usage(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    outcome = backprop(tmp_path, *args)

    assert outcome.exit_code == 1, outcome.stderr  # click's own 2 is our runtime error's code
    assert "Usage: backprop" in outcome.stderr and "Traceback" not in outcome.stderr


def test_verbose_shows_the_whole_traceback_of_an_error(tmp_path: Path) -> None:
    outcome = backprop(tmp_path, "--verbose", "runs", "show", "run-does-not-exist")

    assert outcome.exit_code == 1, outcome.stderr
    assert "Traceback (most recent call last)" in outcome.stderr
    assert "error INPUT_NOT_FOUND:" in outcome.stderr


def test_multi_run_resume_continues_the_named_campaign(tmp_path: Path) -> None:
    outcome = backprop(tmp_path, "multi-run", "--resume", "run-does-not-exist")

    assert_user_error(outcome, "INPUT_NOT_FOUND")
    assert "No run id contains 'run-does-not-exist'" in outcome.stderr


def test_a_misspelt_setting_is_reported_with_the_known_name_closest_to_it(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("BACKPROPAGATE_TRAINING__LEARNIG_RATE=1e-4\n")

    outcome = backprop(tmp_path, "config", env={"BACKPROPAGATE_MODEL_NAME": "my/model"})

    assert outcome.exit_code == 0, outcome.stderr
    assert (
        "warning: BACKPROPAGATE_MODEL_NAME (from the environment) is no Backpropagate setting; "
        "did you mean BACKPROPAGATE_MODEL__NAME?" in outcome.stderr
    )
    assert (
        "BACKPROPAGATE_TRAINING__LEARNIG_RATE (from the .env file) is no Backpropagate setting; "
        "did you mean BACKPROPAGATE_TRAINING__LEARNING_RATE?" in outcome.stderr
    )


def test_the_variables_compose_and_the_build_read_are_no_misspelt_settings(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("BACKPROPAGATE_IMAGE_TAG=v1\nBACKPROPAGATE_TRAINER_PORT=6000\n")

    outcome = backprop(tmp_path, "config")

    assert "warning" not in outcome.stderr, outcome.stderr


def test_a_service_logs_a_misspelt_setting_as_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("BACKPROPAGATE_SAFETY__SOURCES", "host")
    settings = Settings(home=tmp_path, safety=SafetySettings(source="host"))

    with caplog.at_level("WARNING", logger="backpropagate_services.stack"):
        start_stack(settings, ["safety"], "127.0.0.1:0").stop(grace=0)

    assert (
        "BACKPROPAGATE_SAFETY__SOURCES (from the environment) is no Backpropagate setting; "
        "did you mean BACKPROPAGATE_SAFETY__SOURCE?" in caplog.text
    )
