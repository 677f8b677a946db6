"""TrainingCallback: the SDK calls a user's hooks from the events of the run it follows, and a
hook that raises is logged while the run and following it go on.

Real short runs of SmolLM2 through the SDK, on services in this process."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_tracking import record_of, trainer_on_its_own_stack

from backpropagate import RunResult, Trainer, TrainingCallback
from backpropagate_api.errors import DatasetEmptyError, UserError
from backpropagate_api.layout import checkpoint_prefix

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Calls:
    steps: list[tuple[int, float]] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    completed: list[RunResult] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)

    def callback(self) -> TrainingCallback:
        return TrainingCallback(
            on_step=lambda step, loss: self.steps.append((step, loss)),
            on_epoch=self.epochs.append,
            on_save=self.saved.append,
            on_complete=self.completed.append,
            on_error=self.errors.append,
        )


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Trainer]:
    home = tmp_path_factory.mktemp("callbacks-home")
    with trainer_on_its_own_stack(
        home, model_cache, report_to="none", batch_size=1, max_seq_length=64
    ) as client:
        yield client


@pytest.mark.model
def test_a_callback_sees_every_step_epoch_checkpoint_and_the_result_and_watch_replays_them(
    trainer: Trainer, quickstart: Path
) -> None:
    calls = Calls()

    # 3 steps of 4 of the 10 conversations: the first pass over the data ends at step 3.
    run = trainer.train(
        quickstart, steps=3, batch_size=4, checkpoint_every=1, callback=calls.callback()
    )

    assert calls.steps == list(enumerate(run.loss_history, start=1))
    assert len(calls.steps) == 3
    assert calls.epochs == [1]
    assert calls.saved == [checkpoint_prefix(run.run_id, step, 1) for step in (1, 2, 3)]
    kept = [checkpoint.key for checkpoint in record_of(trainer, run.run_id).checkpoints]
    assert kept and set(kept) <= set(calls.saved)
    assert calls.completed == [run]
    assert calls.errors == []

    watched = Calls()
    assert trainer.watch(run.run_id, callback=watched.callback()) == run
    assert (watched.steps, watched.epochs, watched.saved) == (
        calls.steps,
        calls.epochs,
        calls.saved,
    )
    assert watched.completed == [run]


@pytest.mark.model
def test_a_run_that_fails_on_the_worker_calls_on_error_with_the_error_train_raises(
    trainer: Trainer, quickstart: Path
) -> None:
    calls = Calls()

    # Valid at submit; on the worker, no conversation keeps an assistant token in 2 tokens.
    with pytest.raises(DatasetEmptyError) as caught:
        trainer.train(quickstart, steps=2, max_length=2, callback=calls.callback())

    assert calls.errors == [caught.value]
    assert caught.value.code == "INPUT_DATASET_EMPTY"
    assert calls.completed == [] and calls.steps == []


@pytest.mark.model
def test_a_hook_that_raises_is_logged_once_with_its_traceback_and_the_run_goes_on(
    trainer: Trainer, quickstart: Path, caplog: pytest.LogCaptureFixture
) -> None:
    completed: list[RunResult] = []

    def failing_step(step: int, loss: float) -> None:
        raise RuntimeError(f"dashboard down at step {step}")

    callback = TrainingCallback(on_step=failing_step, on_complete=completed.append)
    with caplog.at_level(logging.WARNING, logger="backpropagate.callbacks"):
        run = trainer.train(quickstart, steps=2, callback=callback)

    assert run.status == "succeeded" and len(run.loss_history) == 2
    assert completed == [run]
    records = [record for record in caplog.records if record.name == "backpropagate.callbacks"]
    assert [record.levelname for record in records] == ["ERROR", "WARNING"]
    assert "TrainingCallback.on_step raised" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert "dashboard down at step 1" in str(records[0].exc_info[1])
    assert "raised 2 times in all" in records[1].getMessage()


def test_a_callback_with_wait_false_is_refused_before_anything_is_submitted(
    trainer: Trainer, quickstart: Path
) -> None:
    with pytest.raises(UserError, match="wait=False"):
        trainer.train(quickstart, steps=1, wait=False, callback=TrainingCallback())
