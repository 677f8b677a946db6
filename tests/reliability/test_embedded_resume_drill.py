"""Drills of the embedded default (no servers): a `backprop train` killed with SIGKILL is
finished by `backprop runs resume`; a detached run trains in a background process while
`backprop runs watch`, a separate process, follows it.

Every command is a real `backprop` process sharing one home directory: the queue file and the
local store are what carries the run from one process to the next.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_drills import (
    BACKPROP,
    backprop,
    checkpointed_runs,
    holding_at,
    run_record,
    stop_once_checkpointed,
)

pytestmark = [pytest.mark.model]

STEPS = 14
TRAIN_ARGS = ["--steps", str(STEPS), "--batch-size", "2", "--max-length", "128"]


def test_cli_killed_then_interrupted_is_finished_by_runs_resume(
    home_env: dict[str, str], quickstart: Path
) -> None:
    home = Path(home_env["BACKPROPAGATE_HOME"])
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    train = [BACKPROP, "train", "--data", str(quickstart), *TRAIN_ARGS, "--checkpoint-every", "2"]

    # SIGKILL: no exit hook runs, as a power cut for the run. Each run holds after the
    # checkpoint the drill waits for, so the signal finds it mid-run on a machine of any speed.
    held = subprocess.Popen(train, env=holding_at(home_env, 5), **quiet)
    stop_once_checkpointed(held, home, 4, signal.SIGKILL)
    [run_id] = checkpointed_runs(home, 4)
    killed = run_record(home_env, run_id)
    assert killed["status"] == "JOB_STATUS_RUNNING"
    assert killed["last_checkpoint_step"] == len(killed["loss_history"]) == 4

    # Ctrl-C of the resuming process: it checkpoints where it is and leaves the run interrupted.
    resume = [BACKPROP, "runs", "resume", run_id]
    exit_code = stop_once_checkpointed(
        subprocess.Popen(resume, env=holding_at(home_env, 9), **quiet), home, 8, signal.SIGINT
    )
    assert exit_code == 130
    interrupted = run_record(home_env, run_id)
    assert interrupted["status"] == "JOB_STATUS_INTERRUPTED"
    assert interrupted["resumed_from_step"] == killed["last_checkpoint_step"]
    assert interrupted["last_checkpoint_step"] == len(interrupted["loss_history"]) == 8

    started = time.monotonic()
    backprop(home_env, "runs", "resume", run_id)
    resume_seconds = time.monotonic() - started

    record = run_record(home_env, run_id)
    assert record["status"] == "JOB_STATUS_SUCCEEDED"
    assert record["attempts"] == 3
    assert record["resumed_from_step"] == interrupted["last_checkpoint_step"]
    assert len(record["loss_history"]) == STEPS  # no step twice, none missing
    assert record["loss_history"][:4] == killed["loss_history"][:4]
    assert record["last_checkpoint_step"] == STEPS
    assert (home / "artifacts" / "runs" / run_id / "adapter" / "MANIFEST.json").is_file()
    print(
        f"killed at step {len(killed['loss_history'])} (checkpoint "
        f"{killed['last_checkpoint_step']}), interrupted at step "
        f"{interrupted['last_checkpoint_step']}, finished in {resume_seconds:.1f} s"
    )


def test_detached_run_trains_in_the_background_and_runs_watch_follows_it(
    home_env: dict[str, str], quickstart: Path
) -> None:
    started = time.monotonic()
    # The budget as epochs this time: 2 passes over the 10 quickstart conversations, 2 a step.
    epochs = ["--epochs", "2", "--batch-size", "2", "--max-length", "128"]
    run_id = backprop(home_env, "train", "--data", str(quickstart), *epochs, "--detach")
    run_id = run_id.strip()
    detach_seconds = time.monotonic() - started
    assert run_id.startswith("run-")

    watched = backprop(home_env, "runs", "watch", run_id)

    assert "succeeded" in watched
    record = run_record(home_env, run_id)
    assert record["status"] == "JOB_STATUS_SUCCEEDED"
    assert len(record["loss_history"]) == record["steps"] == 10
    assert record["config"]["epochs"] == 2
    assert record["attempts"] == 1
    assert record["last_checkpoint_step"] == 10  # always a checkpoint at the end
    logs = list((Path(home_env["BACKPROPAGATE_HOME"]) / "logs").glob("worker-*.log"))
    assert len(logs) == 1, "the run was not trained by one background worker"
    print(f"--detach returned in {detach_seconds:.1f} s")

    # `replay`, named by a part of the id: a new run with the same config and dataset.
    backprop(home_env, "replay", run_id[-6:])
    [replayed] = [
        run
        for run in json.loads(backprop(home_env, "runs", "list", "--json"))["runs"]
        if run["run_id"] != run_id
    ]
    assert replayed["status"] == "JOB_STATUS_SUCCEEDED"
    assert (replayed["config"], replayed["dataset_id"]) == (record["config"], record["dataset_id"])
    # Same seed, same data, same config: the same losses.
    assert replayed["loss_history"] == pytest.approx(record["loss_history"], rel=1e-4)
