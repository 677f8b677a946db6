"""Experiment tracking: a run's report_to decides which trackers get its metrics, and TensorBoard
holds exactly the numbers the run record keeps, under backprop-<run_id>.

Real short runs of SmolLM2 on the trainer and dataprep services in this process, through the
SDK; TensorBoard's own EventAccumulator reads the event files back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from backpropagate import Trainer
from backpropagate_api.errors import ConfigError
from backpropagate_api.settings import Settings
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.models import OFFLINE_DEFAULT_ALIAS
from backpropagate_services.stack import start_stack
from backpropagate_services.trainer.runtime.tracking import (
    TRACKERS,
    RunTracking,
    event_metrics,
    installed,
    resolve_report_to,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextmanager
def trainer_on_its_own_stack(home: Path, model_cache: Path, **trainer: Any) -> Iterator[Trainer]:
    """A Trainer (SmolLM2, no progress bars) talking to a dataprep + trainer + safety stack that
    runs in this process on `home`, as the embedded default does, but started for this test
    module alone: its settings (the TensorBoard directory) are the ones the test reads."""
    settings = Settings(home=home, model_cache=model_cache)
    stack = start_stack(settings, ["dataprep", "trainer", "safety"], "127.0.0.1:0")
    client = settings.model_copy(update={"endpoint": stack.address})
    try:
        yield Trainer(OFFLINE_DEFAULT_ALIAS, settings=client, progress=False, **trainer)
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tracking-home")


@pytest.fixture(scope="module")
def trainer(home: Path, model_cache: Path) -> Iterator[Trainer]:
    """Tracking off unless a train() call says otherwise."""
    with trainer_on_its_own_stack(
        home, model_cache, report_to="none", batch_size=1, max_seq_length=64, learning_rate=1e-3
    ) as client:
        yield client


def record_of(trainer: Trainer, run_id: str) -> trainer_pb2.RunRecord:
    connection = trainer.reader
    request = trainer_pb2.GetRunRequest(run_id=run_id)
    return connection.call("trainer", connection.trainer.GetRun, request)


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def as_logged(values: list[float]) -> list[float]:
    """TensorBoard keeps scalars as float32."""
    return [float(np.float32(value)) for value in values]


@pytest.mark.model
def test_a_run_reporting_to_tensorboard_logs_the_record_s_losses_under_backprop_run_id(
    trainer: Trainer, home: Path, quickstart: Path
) -> None:
    run = trainer.train(
        quickstart, steps=3, eval_split=0.2, eval_every=1, report_to=["tensorboard"]
    )

    record = record_of(trainer, run.run_id)
    log_dir = home / "tensorboard" / f"backprop-{run.run_id}"
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert scalars(log_dir, "train/loss") == list(
        zip([1, 2, 3], as_logged(list(record.loss_history)), strict=True)
    )
    assert [step for step, _ in scalars(log_dir, "train/learning_rate")] == [1, 2, 3]
    assert all(rate > 0 for _, rate in scalars(log_dir, "train/tokens_per_second"))
    # The base model's eval loss first (step 0), then one after every step.
    assert scalars(log_dir, "eval/loss") == [
        (point.step, float(np.float32(point.loss))) for point in record.evals
    ]
    assert [point.step for point in record.evals] == [0, 1, 2, 3]
    # The Trainer's hyperparameters reached the run; train()'s report_to won over its "none".
    assert list(record.config.report_to) == ["tensorboard"]
    assert (record.config.batch_size, record.config.max_length) == (1, 64)
    assert record.config.learning_rate == pytest.approx(1e-3)


@pytest.mark.model
def test_report_to_none_writes_no_tensorboard_logs(
    trainer: Trainer, home: Path, quickstart: Path
) -> None:
    run = trainer.train(quickstart, steps=1)  # report_to="none" from the Trainer

    assert run.status == "succeeded"
    assert list(record_of(trainer, run.run_id).config.report_to) == ["none"]
    assert not (home / "tensorboard" / f"backprop-{run.run_id}").exists()


def test_an_unknown_tracker_is_refused_at_submit_with_the_names_that_work(
    trainer: Trainer, quickstart: Path
) -> None:
    runs_before = len(trainer.reader.trainer.ListRuns(trainer_pb2.ListRunsRequest()).runs)

    with pytest.raises(ConfigError, match="tensorbored") as caught:
        trainer.train(quickstart, steps=1, report_to=["tensorboard", "tensorbored"])

    assert caught.value.code == "INPUT_CONFIG_INVALID"
    assert "tensorboard, wandb, mlflow" in caught.value.hint
    assert len(trainer.reader.trainer.ListRuns(trainer_pb2.ListRunsRequest()).runs) == runs_before


def test_a_named_tracker_that_is_not_installed_is_refused_with_how_to_install_it() -> None:
    missing = [tracker for tracker in TRACKERS if not installed(tracker)]
    assert missing, "the project's environment installs tensorboard only"

    with pytest.raises(ConfigError, match=missing[0]) as caught:
        resolve_report_to([missing[0]])

    assert f"pip install {missing[0]}" in caught.value.hint


def test_auto_picks_every_installed_tracker_and_none_picks_none() -> None:
    installed_here = [tracker for tracker in TRACKERS if installed(tracker)]

    assert "tensorboard" in installed_here
    assert resolve_report_to([]) == installed_here
    assert resolve_report_to(["auto"]) == installed_here
    assert resolve_report_to(["none"]) == []
    assert resolve_report_to(["TensorBoard", "tensorboard"]) == ["tensorboard"]
    with pytest.raises(ConfigError, match="auto"):
        resolve_report_to(["auto", "tensorboard"])


def test_preference_metrics_are_logged_only_for_preference_runs() -> None:
    step = trainer_pb2.RunEvent(
        kind="step", step=4, loss=0.5, learning_rate=1e-4, reward_margin=0.0, reward_accuracy=0.0
    )

    assert set(event_metrics(step, preference=False)) == {
        "train/loss",
        "train/learning_rate",
        "train/tokens_per_second",
    }
    # A margin of 0 is a value on a preference run (proto3 cannot tell it from "unset").
    assert event_metrics(step, preference=True)["train/reward_margin"] == 0.0
    assert event_metrics(trainer_pb2.RunEvent(kind="checkpoint", step=4), preference=True) == {}


def test_a_resumed_attempt_replaces_what_the_earlier_one_logged_after_its_checkpoint(
    tmp_path: Path,
) -> None:
    record = trainer_pb2.RunRecord(
        run_id="run-1", config=trainer_pb2.TrainConfig(report_to=["tensorboard"])
    )

    def attempt(steps: range, loss: float) -> None:
        tracking = RunTracking(record, tmp_path)
        for step in steps:
            tracking.observe(trainer_pb2.RunEvent(kind="step", step=step, loss=loss))
        tracking.close(common_pb2.JOB_STATUS_SUCCEEDED)

    attempt(range(1, 6), loss=1.0)  # died after step 5, checkpointed at step 3
    record.attempts, record.last_checkpoint_step = 1, 3
    attempt(range(4, 7), loss=2.0)

    assert scalars(tmp_path / "backprop-run-1", "train/loss") == [
        (1, 1.0),
        (2, 1.0),
        (3, 1.0),
        (4, 2.0),
        (5, 2.0),
        (6, 2.0),
    ]
