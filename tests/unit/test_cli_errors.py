"""The installed `backprop` command reports a user's mistake as one stable code, a hint and exit
status 1: never a Python traceback.

Each command runs the real console script in a fresh process with its own BACKPROPAGATE_HOME and
an empty working directory, so no developer `.env` or endpoint applies. `runs show` starts the
embedded stack in that process (the default for users), which imports torch: it is the only one
that does. The bad-dataset case talks to a real dataprep service in this test process instead,
so its error crosses a process boundary on its way to the user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backpropagate import cli
from backpropagate_api.errors import EXIT_RUNTIME_ERROR
from backpropagate_api.settings import SafetySettings, Settings
from backpropagate_services.stack import RunningStack, start_stack

BACKPROP = Path(sys.executable).parent / "backprop"
TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    stdout: str
    stderr: str


def backprop(
    home: Path, *args: str, endpoint: str | None = None, env: dict[str, str] | None = None
) -> Outcome:
    """Run `backprop ARGS` in `home` (with `env` added to the environment); with no `endpoint`
    it runs the embedded stack."""
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("BACKPROPAGATE_")
    }
    environment |= {
        "BACKPROPAGATE_HOME": str(home / "state"),
        "BACKPROPAGATE_SAFETY__SOURCE": "host",
        "COLUMNS": "200",  # rich must not wrap a message in the middle of what we look for
        "NO_COLOR": "1",
    }
    if endpoint is not None:
        environment["BACKPROPAGATE_ENDPOINT"] = endpoint
    done = subprocess.run(
        [str(BACKPROP), *args],
        cwd=home,
        env=environment | (env or {}),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


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

    outcome = backprop(tmp_path, "runs", "list")

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
    def broken() -> None:
        raise KeyError("[never] shown as markup")

    monkeypatch.setattr(cli, "app", broken)
    monkeypatch.delenv("BACKPROPAGATE_DEBUG", raising=False)

    with pytest.raises(SystemExit) as exited:
        cli.main()

    stderr = capsys.readouterr().err
    assert exited.value.code == EXIT_RUNTIME_ERROR
    assert "error INTERNAL: KeyError: '[never] shown as markup'" in stderr
    assert "BACKPROPAGATE_DEBUG=1" in stderr and "Traceback" not in stderr
