"""The run history commands, as a user runs them: `backprop` processes on a home whose store
holds three run records (written as the trainer writes them, without training)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backpropagate.run_history import as_csv, differences, parse_status
from backpropagate_api.errors import UserError
from backpropagate_api.layout import run_record_key
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.records import save_record
from backpropagate_services.common.store.local import LocalDirStore

BACKPROP = str(Path(sys.executable).parent / "backprop")


def record(run_id: str, status: int, learning_rate: float, loss: float, created: float):
    return trainer_pb2.RunRecord(
        run_id=run_id,
        status=status,  # type: ignore[arg-type]
        dataset_id="d" * 64,
        base_model="smollm2-135m-instruct",
        steps=10,
        final_loss=loss,
        loss_history=[loss + 1, loss],
        created_at=created,
        attempts=1,
        config=trainer_pb2.TrainConfig(steps=10, learning_rate=learning_rate, seed=42),
    )


RUNS = [
    record("run-20261124T100000-aaa111", common_pb2.JOB_STATUS_SUCCEEDED, 2e-4, 1.5, 1.0),
    record("run-20261124T110000-bbb222", common_pb2.JOB_STATUS_FAILED, 1e-3, 3.0, 2.0),
    record("run-20261124T120000-aaa333", common_pb2.JOB_STATUS_SUCCEEDED, 2e-4, 1.25, 3.0),
]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("history-home")
    store = LocalDirStore(home / "artifacts")
    for run in RUNS:
        save_record(store, run_record_key(run.run_id), run)
    return home


def backprop(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(
        [BACKPROP, *args], env=env, capture_output=True, text=True, check=False, timeout=120
    )


def test_list_runs_filters_by_status_newest_first_as_json(home: Path) -> None:
    done = backprop(home, "list-runs", "--status", "succeeded", "--json", "--limit", "100")

    assert done.returncode == 0, done.stderr
    listed = [run["run_id"] for run in json.loads(done.stdout)["runs"]]
    assert listed == ["run-20261124T120000-aaa333", "run-20261124T100000-aaa111"]


def test_show_run_accepts_a_unique_part_of_the_id_and_refuses_an_ambiguous_one(home: Path):
    shown = backprop(home, "show-run", "bbb2", "--json")
    ambiguous = backprop(home, "runs", "show", "aaa")
    missing = backprop(home, "runs", "show", "zzz")

    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["run_id"] == "run-20261124T110000-bbb222"
    assert ambiguous.returncode == 1
    assert "INPUT_INVALID" in ambiguous.stderr and "part of 2 run ids" in ambiguous.stderr
    assert missing.returncode == 1 and "INPUT_NOT_FOUND" in missing.stderr


def test_diff_runs_shows_only_what_differs(home: Path) -> None:
    done = backprop(home, "diff-runs", "aaa111", "bbb222", "--json")

    assert done.returncode == 0, done.stderr
    differing = json.loads(done.stdout)["differences"]
    assert differing["config.learning_rate"] == [0.0002, 0.001]
    assert differing["status"] == ["succeeded", "failed"]
    assert differing["final_loss"] == [1.5, 3.0]
    assert "config.steps" not in differing and "base_model" not in differing


def test_export_runs_writes_every_record_as_jsonl_or_csv(home: Path, tmp_path: Path) -> None:
    as_jsonl = backprop(home, "export-runs", "--format", "jsonl")
    to_file = backprop(
        home, "runs", "export", "--format", "csv", "--output", str(tmp_path / "r.csv")
    )
    wrong = backprop(home, "runs", "export", "--format", "xml")

    assert as_jsonl.returncode == 0, as_jsonl.stderr
    assert [json.loads(line)["run_id"] for line in as_jsonl.stdout.splitlines()] == [
        run.run_id for run in reversed(RUNS)
    ]
    assert to_file.returncode == 0, to_file.stderr
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [row["status"] for row in rows] == ["succeeded", "failed", "succeeded"]
    assert rows[1]["config.learning_rate"] == "0.001"
    assert wrong.returncode == 1 and "jsonl or --format csv" in wrong.stderr


def test_differences_and_csv_of_records() -> None:
    rows = dict((name, (a, b)) for name, a, b in differences(RUNS[0], RUNS[2]))

    assert rows == {"final_loss": (1.5, 1.25), "created_at": (1.0, 3.0)}
    table = list(csv.DictReader(io.StringIO(as_csv(RUNS))))
    assert [row["run_id"] for row in table] == [run.run_id for run in RUNS]


def test_status_names_are_checked() -> None:
    assert parse_status("Failed") == common_pb2.JOB_STATUS_FAILED
    assert parse_status("") == common_pb2.JOB_STATUS_UNSPECIFIED
    with pytest.raises(UserError, match="Unknown run status 'done'") as caught:
        parse_status("done")
    assert caught.value.hint.startswith("Use one of: queued, running, succeeded")
