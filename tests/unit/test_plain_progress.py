"""Headless progress: where output is no terminal (CI logs, nohup, a pipe), a run's events are
plain lines, the run id the moment it is queued, and the latest state at a steady interval even
while no step ends, so a log shows what runs and a no-output watchdog lets a long step be."""

from __future__ import annotations

import io
import time

from rich.console import Console

from backpropagate.progress import (
    PlainExportProgress,
    PlainTrainProgress,
    TrainProgress,
    train_progress,
)
from backpropagate_api.v1 import common_pb2, export_pb2, trainer_pb2

RUN = "run-20260102T030405-a1b2c3"


def _lines(output: io.StringIO) -> list[str]:
    return output.getvalue().splitlines()


def _wait_for_lines(output: io.StringIO, count: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(_lines(output)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return _lines(output)


def test_no_terminal_gets_plain_lines_and_a_terminal_the_bar() -> None:
    piped = Console(file=io.StringIO(), force_terminal=False)
    terminal = Console(file=io.StringIO(), force_terminal=True)

    assert isinstance(train_progress(piped, 30), PlainTrainProgress)
    assert isinstance(train_progress(terminal, 30), TrainProgress)


def test_the_run_id_comes_at_once_and_the_latest_step_at_every_interval_while_none_ends() -> None:
    output = io.StringIO()
    with PlainTrainProgress(Console(file=output, force_terminal=False), 0.3) as progress:
        progress(trainer_pb2.RunEvent(run_id=RUN, kind="queued", status=1))
        queued_at_once = _lines(output)
        progress(
            trainer_pb2.RunEvent(
                run_id=RUN,
                kind="step",
                step=3,
                total_steps=100,
                loss=1.2345,
                learning_rate=2e-4,
                tokens_per_second=150,
                eta_seconds=97,
                safety_level=common_pb2.SAFETY_LEVEL_SAFE,
            )
        )
        after_a_step = _lines(output)
        # A long step: nothing happens, and the latest state comes again and again.
        heartbeats = _wait_for_lines(output, 3)
        progress(trainer_pb2.RunEvent(run_id=RUN, kind="checkpoint", step=3, message="step 3"))
        checkpoint = _lines(output)[-1]

    assert queued_at_once == [f"run {RUN}: queued"]
    assert after_a_step == queued_at_once  # steps are not printed one by one
    assert heartbeats[1].startswith(
        f"run {RUN}: step 3/100  loss 1.2345  lr 2.0e-04  150 tok/s  eta 97s  safety safe"
    )
    assert heartbeats[2].startswith(f"run {RUN}: step 3/100") and "s elapsed" in heartbeats[2]
    assert checkpoint == f"run {RUN}: checkpoint: step 3"


def test_an_export_is_a_line_a_stage() -> None:
    output = io.StringIO()
    events = [
        export_pb2.ExportEvent(export_id="exp-1", run_id=RUN, status=1),
        *(
            export_pb2.ExportEvent(
                export_id="exp-1", run_id=RUN, status=2, stage=stage, stage_index=i, stage_count=5
            )
            for i, stage in enumerate(["merge", "merge", "convert"], start=1)
        ),
    ]
    with PlainExportProgress(Console(file=output, force_terminal=False), 30) as progress:
        for event in events:
            progress(event)

    assert _lines(output) == [
        f"export exp-1 of run {RUN}: queued",
        f"export exp-1 of run {RUN}: merge (1/5)",
        f"export exp-1 of run {RUN}: merge (2/5)",
        f"export exp-1 of run {RUN}: convert (3/5)",
    ]
