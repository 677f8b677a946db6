"""Drill: the trainer obeys the safety sidecar. A replayed ramp to 91 C pauses the run (after a
checkpoint), a ramp back down resumes it, a ramp to 96 C stops it with
RUNTIME_GPU_TEMPERATURE_CRITICAL, and `ResumeRun` then finishes it from the stop's checkpoint.

Real processes: dataprep, trainer and the safety sidecar with the `replay` source. Each ramp is
a replay file ending on the level under test (the last line holds); the sidecar is restarted
with the next file, which also drills the trainer's reconnection (a degraded-safety warning while
it is away, training going on).

The drill waits for events (a step, a pause), never for time. The run holds before a few steps
(`FaultSettings.hold_at_step`) until the drill creates the release file, and obeys the sidecar
while it holds: each ramp finds the run where the drill left it, on a machine of any speed and
however late the drill acts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import servers
from service_processes import serve, stack_env

from backpropagate.connection import Connection
from backpropagate.workflows import submit_train, upload_dataset
from backpropagate_api.settings import EndpointSettings, Settings
from backpropagate_api.v1 import common_pb2, trainer_pb2

pytestmark = [pytest.mark.model]

STEPS = 8
# Where the run holds, each time until the drill releases it: while the sidecar is away (then it
# trains on without it), until the ramps pause and resume it, and before its last step until the
# ramp to 96 C stops it. Paused before PAUSE_HOLD at the latest, the run is seen two steps past
# its resume before STOP_HOLD.
AWAY_HOLD, PAUSE_HOLD, STOP_HOLD = 3, 5, STEPS


def reading(celsius: float) -> dict[str, object]:
    host = {"memory_used_mb": 4000.0, "memory_total_mb": 16000.0, "memory_percent": 25.0}
    gpu = {
        "index": 0,
        "name": "Replayed GPU",
        "temperature_c": celsius,
        "memory_used_mb": 8000.0,
        "memory_total_mb": 24000.0,
    }
    return {"host": host, "gpus": [gpu]}


def ramp(path: Path, *celsius: float) -> Path:
    path.write_text("".join(json.dumps(reading(value)) + "\n" for value in celsius))
    return path


class Run:
    """A submitted run's events, read as they come, and its record."""

    def __init__(self, connection: Connection, run_id: str) -> None:
        self.connection = connection
        self.run_id = run_id
        request = trainer_pb2.WatchRunRequest(run_id=run_id)
        self.stream: Iterator[trainer_pb2.RunEvent] = iter(
            connection.stream("trainer", connection.trainer.WatchRun, request)
        )
        self.events: list[trainer_pb2.RunEvent] = []

    def until(self, done: callable) -> trainer_pb2.RunEvent:  # type: ignore[valid-type]
        for event in self.stream:
            self.events.append(event)
            if done(event):
                return event
        raise AssertionError(f"the run's events ended before the awaited one: {self.events[-3:]}")

    def record(self) -> trainer_pb2.RunRecord:
        request = trainer_pb2.GetRunRequest(run_id=self.run_id)
        return self.connection.call("trainer", self.connection.trainer.GetRun, request)


def test_critical_pauses_warning_resumes_emergency_stops_and_resume_finishes(
    redis_url: str, s3_endpoint: str, model_cache: Path, quickstart: Path, tmp_path: Path
) -> None:
    addresses = {name: f"127.0.0.1:{servers.free_port()}" for name in ("dataprep", "trainer")}
    safety_address = f"127.0.0.1:{servers.free_port()}"
    release = tmp_path / "release"  # created: the held run goes on (and the hold deletes it)
    env = stack_env(
        redis_url,
        s3_endpoint,
        model_cache,
        tmp_path / "home",
        ENDPOINTS__SAFETY=safety_address,
        SAFETY__SOURCE="replay",
        SAFETY__INTERVAL_SECONDS="0.2",
        SAFETY__RESUME_AFTER_SECONDS="1",
        FAULT__HOLD_AT_STEP=json.dumps([AWAY_HOLD, PAUSE_HOLD, STOP_HOLD]),
        FAULT__HOLD_RELEASE_FILE=str(release),
    )

    def sidecar(replay: Path) -> ExitStack:
        stack = ExitStack()
        stack.enter_context(serve("safety", safety_address, {**env, **replay_env(replay)}))
        return stack

    def replay_env(replay: Path) -> dict[str, str]:
        return {"BACKPROPAGATE_SAFETY__REPLAY_FILE": str(replay)}

    connection = Connection.open(Settings(endpoints=EndpointSettings(**addresses)), workers=False)
    config = trainer_pb2.TrainConfig(
        steps=STEPS, batch_size=2, max_length=128, checkpoint_every=100
    )
    with (
        # Up before the trainer, whose first dial then finds it: a level known before step 1.
        sidecar(ramp(tmp_path / "cool.jsonl", 60)) as cool,
        serve("dataprep", addresses["dataprep"], env),
        serve("trainer", addresses["trainer"], env),
    ):
        dataset = upload_dataset(connection, quickstart)
        run = Run(connection, submit_train(connection, dataset.dataset_id, config))
        seen = run.until(lambda event: event.kind == "step" and event.step == AWAY_HOLD - 1)
        assert seen.safety_level == common_pb2.SAFETY_LEVEL_SAFE  # so its loss is news
        cool.close()
        # The sidecar is gone: the held run warns, and once released trains on without levels.
        degraded = run.until(lambda event: event.kind == "safety_degraded")
        release.touch()
        away = run.until(lambda event: event.kind == "step")
        assert away.step == degraded.step + 1 == AWAY_HOLD
        assert away.safety_level == common_pb2.SAFETY_LEVEL_UNSPECIFIED
        with sidecar(ramp(tmp_path / "up.jsonl", 70, 80, 85, 88, 91)):
            paused = run.until(lambda event: event.kind == "paused")
            # Paused: no step is taken while the level stays critical.
            record = run.record()
            assert record.last_checkpoint_step == paused.step > 0
            steps_before = len(record.loss_history)
        with sidecar(ramp(tmp_path / "down.jsonl", 91, 88, 82, 75, 70)):
            resumed = run.until(lambda event: event.kind == "resumed")
            assert resumed.step == paused.step
            release.touch()
            run.until(lambda event: event.kind == "step" and event.step >= paused.step + 2)
        with sidecar(ramp(tmp_path / "hot.jsonl", 80, 90, 93, 96)):
            ended = run.until(lambda event: event.kind == "ended")
        stopped = run.record()
        assert stopped.status == common_pb2.JOB_STATUS_FAILED
        assert stopped.error.code == "RUNTIME_GPU_TEMPERATURE_CRITICAL"
        assert "96 C" in stopped.error.message
        assert stopped.last_checkpoint_step == len(stopped.loss_history) == ended.step
        assert steps_before == paused.step < stopped.last_checkpoint_step < STEPS

        kinds = [event.kind for event in run.events]
        between = kinds[kinds.index("paused") : kinds.index("resumed")]
        assert "step" not in between

        with sidecar(ramp(tmp_path / "cool-again.jsonl", 60)):
            release.touch()  # the resumed run's hold before its last step
            connection.call(
                "trainer",
                connection.trainer.ResumeRun,
                trainer_pb2.ResumeRunRequest(run_id=run.run_id),
            )
            # A new watch: the last one ended with the stop. This one replays the stop's event
            # and goes on, since the run is running again.
            resumed_run = Run(connection, run.run_id)
            resumed_run.until(lambda event: event.kind == "ended" and event.attempt == 2)
        finished = resumed_run.record()
    assert finished.status == common_pb2.JOB_STATUS_SUCCEEDED
    assert finished.attempts == 2
    assert finished.resumed_from_step == stopped.last_checkpoint_step
    assert len(finished.loss_history) == STEPS
    assert list(finished.loss_history[: stopped.last_checkpoint_step]) == list(stopped.loss_history)
