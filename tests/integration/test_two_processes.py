"""One run in two processes (`--nproc-per-node 2`: torchrun, gloo on this CPU) through the
embedded default, on SmolLM2: the same loss history as the run in one process with the same
global batch and seed, and an adapter that exports to a verified GGUF like any other.

Tolerance: each process packs and sums its own share of a step, so the same fp32 numbers are
added in another order (about 1e-7 relative per sum) and Adam carries the difference on; the
histories agree to 1e-5 relative (measured here: 1e-7), far below what a step changes (1e-1).
Dropout is off: each process draws masks of its own. The run on the tiny model, and what a
killed process does to a run, are in tests/unit/test_distributed_training.py and
tests/reliability/test_distributed_drills.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backpropagate import Trainer
from backpropagate_api.settings import Settings, TrainerSettings

pytestmark = [pytest.mark.model]

RELATIVE = 1e-5
RUN = {"steps": 4, "batch_size": 4, "max_length": 128, "lora_dropout": 0.0, "seed": 11}


@pytest.fixture(scope="module")
def trainer(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    settings = Settings(
        home=tmp_path_factory.mktemp("two-processes-home"),
        model_cache=model_cache,
        trainer=TrainerSettings(cpu_dtype="float32"),  # bf16 would round the comparison away
    )
    return Trainer(settings=settings, progress=False)


@pytest.mark.llama
def test_two_processes_train_the_run_of_one_and_its_adapter_exports_like_any_other(
    trainer: Trainer, quickstart: Path, tmp_path: Path
) -> None:
    one = trainer.train(quickstart, **RUN)
    two = trainer.train(quickstart, nproc_per_node=2, **RUN)

    assert (one.processes, two.processes) == (1, 2)
    assert two.loss_history == pytest.approx(one.loss_history, rel=RELATIVE)
    print(f"one process {one.loss_history}\ntwo processes {two.loss_history}")

    exported = trainer.export("gguf", run_id=two.run_id, output_dir=tmp_path)
    assert exported.path.read_bytes()[:4] == b"GGUF"
    assert exported.record["verification"]["passed"]
    assert exported.top1_agreement >= 0.99
    assert exported.smoke_answer.strip()
