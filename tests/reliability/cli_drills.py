"""What the drills of `backprop` processes share: running a command, reading a record, holding
a run open, and stopping a process once a run has checkpointed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import servers

BACKPROP = str(Path(sys.executable).parent / "backprop")


def backprop(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """Run a `backprop` command to its end; its stdout (a failure shows its stderr)."""
    done = subprocess.run(
        [BACKPROP, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"backprop {' '.join(args)}: {done.stderr[-3000:]}"
    return done.stdout


def holding_at(env: dict[str, str], step: int) -> dict[str, str]:
    """`env` for a process whose run holds before `step` of its job until it is stopped or
    killed (`FaultSettings.hold_at_step`): a drill waits for an event, a checkpoint or a step,
    and its signal then finds the run still going, however fast the machine trains."""
    return {**env, "BACKPROPAGATE_FAULT__HOLD_AT_STEP": str(step)}


def run_record(env: dict[str, str], run_id: str) -> dict:
    return json.loads(backprop(env, "runs", "show", run_id, "--json"))


def checkpointed_runs(
    home: Path, step: int, which: Callable[[dict], bool] = lambda record: True
) -> list[str]:
    """The runs (`which` of them) whose record lists a checkpoint at `step` or later: the
    record, not the checkpoint's files, since a kill between the two leaves the run at the
    earlier one."""
    runs = []
    for record_file in (home / "artifacts").glob("runs/*/run.json"):
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now
        if record.get("last_checkpoint_step", 0) >= step and which(record):
            runs.append(record["run_id"])
    return runs


def stop_once_checkpointed(
    process: subprocess.Popen[bytes],
    home: Path,
    step: int,
    how: signal.Signals,
    which: Callable[[dict], bool] = lambda record: True,
) -> int:
    """Send `how` to `process` once some run's record (of `which`) lists a checkpoint of `step`
    or later; its exit code."""
    try:
        servers.wait_until(
            lambda: bool(checkpointed_runs(home, step, which)),
            what=f"checkpoint at step {step}",
            timeout=240,
            process=process,  # one that ends first fails the drill at once
        )
        process.send_signal(how)
        return process.wait(timeout=60)
    finally:
        process.kill()
