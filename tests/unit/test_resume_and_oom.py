"""Resuming from a checkpoint, gradient accumulation and OOM recovery give the run an
uninterrupted one gives: the loop's promises that unattended training stands on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training_loop import MEMORISE, tiny_llama

from backpropagate_api.errors import CheckpointInvalidError, GpuOutOfMemoryError
from backpropagate_api.training import TrainingConfig
from backpropagate_api.v1 import trainer_pb2
from backpropagate_services.common.store.local import LocalDirStore
from backpropagate_services.trainer.loop.checkpoints import (
    CheckpointManager,
    CheckpointPolicy,
    TrainingState,
)
from backpropagate_services.trainer.loop.sft import (
    LoraTraining,
    OomRecovery,
    StepReport,
    TrainingHooks,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Dropout on, so the RNG state has to be restored too for the runs to agree.
CONFIG = TrainingConfig(steps=8, batch_size=4, learning_rate=1e-2, lora_dropout=0.1, seed=3)


class Recorder(TrainingHooks):
    """Keeps reports, OOM recoveries and the state after chosen steps."""

    def __init__(self, keep_state_at: int = 0, stop_after: int = 0) -> None:
        self.reports: list[StepReport] = []
        self.recoveries: list[OomRecovery] = []
        self.keep_state_at = keep_state_at
        self.stop_after = stop_after
        self.kept: TrainingState | None = None

    def before_step(self, step: int, training: LoraTraining) -> None:
        if self.stop_after and step > self.stop_after:
            raise KeyboardInterrupt  # as a killed worker: no more steps

    def after_step(self, report: StepReport, training: LoraTraining) -> None:
        self.reports.append(report)
        if report.step == self.keep_state_at:
            self.kept = training.state()

    def on_oom_recovery(self, recovery: OomRecovery) -> None:
        self.recoveries.append(recovery)


def adapter_of(training: LoraTraining) -> dict[str, torch.Tensor]:
    return training.state().adapter


def new_training(tokenizer, config: TrainingConfig = CONFIG, **kwargs) -> LoraTraining:
    return LoraTraining(tiny_llama(tokenizer), tokenizer, MEMORISE, config, **kwargs)


def assert_same_adapter(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=1e-5, atol=1e-6)


def test_resumed_run_continues_exactly_where_the_checkpoint_left_off(smollm2_tokenizer, tmp_path):
    uninterrupted = new_training(smollm2_tokenizer)
    whole = Recorder()
    uninterrupted.run(whole)

    first = new_training(smollm2_tokenizer)
    interrupted = Recorder(keep_state_at=3, stop_after=5)  # dies two steps after the checkpoint
    with pytest.raises(KeyboardInterrupt):
        first.run(interrupted)
    manager = CheckpointManager(LocalDirStore(tmp_path), "run-1", CheckpointPolicy())
    assert interrupted.kept is not None
    saved = manager.save(interrupted.kept, attempt=1)

    resumed = new_training(smollm2_tokenizer, resume=manager.load(saved.key))
    after = Recorder()
    _, outcome = resumed.run(after)

    assert [report.step for report in after.reports] == [4, 5, 6, 7, 8]
    assert outcome.loss_history == pytest.approx([r.loss for r in whole.reports], rel=1e-5)
    assert len(outcome.loss_history) == CONFIG.steps
    assert_same_adapter(adapter_of(resumed), adapter_of(uninterrupted))


def test_gradient_accumulation_gives_the_same_steps_as_one_batch(smollm2_tokenizer):
    config = TrainingConfig(steps=4, batch_size=4, learning_rate=1e-2, lora_dropout=0.0)
    whole = new_training(smollm2_tokenizer, config)
    whole.run()
    split = new_training(
        smollm2_tokenizer,
        TrainingConfig(**{**vars(config), "gradient_accumulation": 4}),
    )
    split.run()

    assert split.micro_batch_size == 1
    assert split.loss_history == pytest.approx(whole.loss_history, rel=1e-5)
    assert_same_adapter(adapter_of(split), adapter_of(whole))


def test_out_of_memory_drill_halves_the_micro_batch_and_takes_the_step_again(smollm2_tokenizer):
    # Without dropout: smaller micro-batches draw other dropout masks.
    config = TrainingConfig(**{**vars(CONFIG), "lora_dropout": 0.0})
    plain = new_training(smollm2_tokenizer, config)
    plain.run()
    drilled = new_training(smollm2_tokenizer, config, oom_drill_step=3)
    hooks = Recorder()
    _, outcome = drilled.run(hooks)

    assert hooks.recoveries == [
        OomRecovery(step=3, micro_batch_size=2, gradient_accumulation=2, recoveries=1)
    ]
    assert [report.step for report in hooks.reports] == list(range(1, 9))
    assert drilled.micro_batch_size == 2 and drilled.oom_recoveries == 1
    # Same batches, same effective batch: the same run, in float tolerance.
    assert outcome.loss_history == pytest.approx(plain.loss_history, rel=1e-5)
    assert_same_adapter(adapter_of(drilled), adapter_of(plain))


def test_out_of_memory_with_recovery_off_fails_at_once(smollm2_tokenizer):
    drilled = new_training(smollm2_tokenizer, oom_recovery=False, oom_drill_step=2)

    with pytest.raises(GpuOutOfMemoryError, match="after 0 recoveries"):
        drilled.run()
    assert drilled.step == 1


def info(step: int, loss: float) -> trainer_pb2.CheckpointInfo:
    return trainer_pb2.CheckpointInfo(step=step, loss=loss)


def test_policy_keeps_the_last_k_and_the_best_n_by_loss():
    checkpoints = [info(10, 2.0), info(20, 0.5), info(30, 0.9), info(40, 1.1), info(50, 1.2)]

    kept = CheckpointPolicy(keep_last=2, keep_best=1).kept(checkpoints)

    assert [checkpoint.step for checkpoint in kept] == [20, 40, 50]
    assert [c.step for c in CheckpointPolicy(keep_last=1, keep_best=0).kept(checkpoints)] == [50]


def test_manager_lists_only_complete_checkpoints_and_prunes_the_rest(smollm2_tokenizer, tmp_path):
    store = LocalDirStore(tmp_path)
    manager = CheckpointManager(store, "run-1", CheckpointPolicy(keep_last=1, keep_best=1))
    training = new_training(smollm2_tokenizer, TrainingConfig(steps=3, learning_rate=1e-2))
    saved = []
    for _ in range(3):
        state = training.state()
        state.step += len(saved) + 1
        state.loss_history = [3.0 - len(saved)]
        saved.append(manager.save(state, attempt=1))
    # A worker that died while writing step 4 left files but no manifest.
    store.put_bytes("runs/run-1/checkpoints/step-00000004-attempt-002/state.pt", b"half")

    assert manager.complete() == [checkpoint.key for checkpoint in saved]
    kept = manager.prune(saved)

    assert [checkpoint.step for checkpoint in kept] == [3]
    assert manager.complete() == [saved[2].key]
    assert not store.list("runs/run-1/checkpoints/step-00000004-attempt-002/")
    assert saved[0].size_bytes > 0 and saved[0].key.endswith("step-00000001-attempt-001")
    with pytest.raises(CheckpointInvalidError):
        manager.load(saved[0].key)


def test_a_corrupt_checkpoint_is_a_stable_error(smollm2_tokenizer, tmp_path: Path):
    store = LocalDirStore(tmp_path)
    manager = CheckpointManager(store, "run-1", CheckpointPolicy())
    saved = manager.save(new_training(smollm2_tokenizer).state(), attempt=1)
    (tmp_path / saved.key / "state.pt").write_bytes(b"not a checkpoint")

    with pytest.raises(CheckpointInvalidError, match="cannot be read"):
        manager.load(saved.key)
