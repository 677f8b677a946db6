"""A run trained by several processes (`runtime.ranks`) against the same run in one: two
processes on this CPU with gloo, the tiny random Llama, each process taking its share of every
step's batch; and the runs that cannot be shared, refused at submit.

Tolerance: each process packs and sums its own share, so the same fp32 numbers are added in
another order (about 1e-7 relative per sum) and Adam carries the difference from step to step;
loss histories, and each weight matrix by its norm, agree to 1e-5 relative over these runs, far
below what one step changes (about 1e-2). Dropout is off: each process draws masks of its own
(as it must), so with dropout the runs agree in distribution, not number for number.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed_ranks import RankRun, StopAtStep, train_in_ranks
from service_processes import in_process_stack
from tiny_models import tiny_llama

from backpropagate.connection import Connection
from backpropagate.workflows import submit_multi_run, submit_train, upload_dataset
from backpropagate_api.errors import ConfigError, JobCancelledError
from backpropagate_api.settings import Settings, TrainerSettings
from backpropagate_api.training import TrainingConfig
from backpropagate_api.v1 import trainer_pb2
from backpropagate_services.stack import SERVICES
from backpropagate_services.trainer.loop.sft import LoraTraining
from backpropagate_services.trainer.runtime.ranks import RunEnded

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RELATIVE = 1e-5
CONVERSATIONS = [
    [
        {"role": "user", "content": f"What is code word {i}?" + " Please answer." * (i % 3)},
        {"role": "assistant", "content": f"Code word {i} is {word}." + " Indeed." * (i % 4)},
    ]
    for i, word in enumerate(["apple", "river", "stone", "cloud", "maple", "ember", "frost"])
]
CONFIG = TrainingConfig(
    steps=6, batch_size=4, learning_rate=1e-2, lora_dropout=0.0, warmup_ratio=0.0, seed=7
)


def one_process(tokenizer, config: TrainingConfig = CONFIG, **options) -> LoraTraining:
    training = LoraTraining(tiny_llama(tokenizer), tokenizer, CONVERSATIONS, config, **options)
    training.run()
    return training


def assert_same_run(runs: list[RankRun], reference: LoraTraining) -> None:
    for run in runs:
        assert run.error is None, (run.rank, run.error)
        assert run.loss_history == pytest.approx(reference.loss_history, rel=RELATIVE)
        weights = reference.trained_weights()
        assert run.weights.keys() == weights.keys()
        for name, weight in weights.items():
            difference = float((run.weights[name] - weight).norm() / weight.norm())
            assert difference < RELATIVE, (run.rank, name, difference)


def test_two_processes_train_the_run_one_process_trains_on_the_same_global_batch(
    smollm2_dir: Path, smollm2_tokenizer, tmp_path: Path
) -> None:
    reference = one_process(smollm2_tokenizer)
    runs = train_in_ranks(2, smollm2_dir, CONVERSATIONS, CONFIG, tmp_path)

    assert_same_run(runs, reference)
    assert [run.micro_batch_size for run in runs] == [reference.micro_batch_size] * 2
    assert [run.held for run in runs] == [1.0, 1.0]  # an adapter is whole in each


def test_an_out_of_memory_error_on_one_process_halves_the_micro_batch_on_every_process(
    smollm2_dir: Path, smollm2_tokenizer, tmp_path: Path
) -> None:
    """Rank 1 alone runs out of memory in step 3; both halve their micro-batch and take the step
    again, so the run is still the one process's (OOM recovery keeps the batch)."""
    config = TrainingConfig(**{**vars(CONFIG), "batch_size": 8})
    reference = one_process(smollm2_tokenizer, config)
    runs = train_in_ranks(
        2, smollm2_dir, CONVERSATIONS, config, tmp_path, options={1: {"oom_drill_step": 3}}
    )

    assert_same_run(runs, reference)
    assert [(run.oom_recoveries, run.micro_batch_size) for run in runs] == [(1, 4), (1, 4)]


def test_a_cancel_on_rank_zero_ends_the_run_on_every_process_at_the_same_step(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    """Rank 0 holds before step 2 (the other waits), then is cancelled before step 4: rank 0
    raises the cancel, the other ends its run there too, both after step 3."""
    hooks = StopAtStep(4, JobCancelledError("Cancelled before step 4 of 6."), hold_at=2)
    runs = train_in_ranks(2, smollm2_dir, CONVERSATIONS, CONFIG, tmp_path, hooks=hooks)

    assert isinstance(runs[0].error, JobCancelledError)
    assert isinstance(runs[1].error, RunEnded)
    assert [run.steps_done for run in runs] == [3, 3]


def test_a_run_checkpointed_by_two_processes_goes_on_in_one_and_the_reverse(
    smollm2_dir: Path, smollm2_tokenizer, tmp_path: Path
) -> None:
    """The checkpoint holds rank 0's state and the global data position: whoever goes on from
    it trains the steps the uninterrupted run would have."""
    reference = one_process(smollm2_tokenizer)
    stop = StopAtStep(4, JobCancelledError("stopped for the test"))

    two = train_in_ranks(2, smollm2_dir, CONVERSATIONS, CONFIG, tmp_path / "two", hooks=stop)
    assert two[0].state is not None and two[0].state.step == 3
    resumed = one_process(smollm2_tokenizer, resume=two[0].state)
    assert resumed.loss_history == pytest.approx(reference.loss_history, rel=RELATIVE)

    one = LoraTraining(tiny_llama(smollm2_tokenizer), smollm2_tokenizer, CONVERSATIONS, CONFIG)
    with pytest.raises(JobCancelledError):
        one.run(stop)
    runs = train_in_ranks(
        2,
        smollm2_dir,
        CONVERSATIONS,
        CONFIG,
        tmp_path / "one",
        options={rank: {"resume": one.state()} for rank in range(2)},
    )
    assert_same_run(runs, reference)


FULL = TrainingConfig(**{**vars(CONFIG), "adapter": "full", "learning_rate": 1e-3})


def test_a_full_fine_tune_sharded_over_two_processes_trains_the_run_of_one(
    smollm2_dir: Path, smollm2_tokenizer, tmp_path: Path
) -> None:
    """FSDP2: each process holds half of every weight and moment; the run is still one
    process's, and its checkpoint (gathered whole) goes on in one process."""
    reference = one_process(smollm2_tokenizer, FULL)
    runs = train_in_ranks(2, smollm2_dir, CONVERSATIONS, FULL, tmp_path / "whole")
    assert_same_run(runs, reference)
    assert [run.held for run in runs] == pytest.approx([0.5, 0.5], abs=0.01)

    stop = StopAtStep(4, JobCancelledError("stopped for the test"))
    two = train_in_ranks(2, smollm2_dir, CONVERSATIONS, FULL, tmp_path / "half", hooks=stop)
    resumed = one_process(smollm2_tokenizer, FULL, resume=two[0].state)
    assert resumed.loss_history == pytest.approx(reference.loss_history, rel=RELATIVE)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Connection]:
    """The trainer's API, no worker: a refused run is refused at submit."""
    settings = Settings(
        home=tmp_path_factory.mktemp("submit-home"),
        model_cache=model_cache,
        trainer=TrainerSettings(cpu_dtype="float32"),
    )
    with in_process_stack(settings, ["dataprep", "trainer"], start_workers=False) as stack:
        connection = Connection(dict.fromkeys(SERVICES, stack.address), embedded=False)
        yield connection
        connection.close()


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"nproc_per_node": 65}, "nproc_per_node"),
        ({"nproc_per_node": 2, "method": "dpo"}, "method,nproc_per_node"),
        ({"nproc_per_node": 3, "batch_size": 2}, "batch_size,nproc_per_node"),
        ({"nproc_per_node": 8}, "batch_size,nproc_per_node"),  # the default batch is 4
    ],
)
def test_a_run_its_processes_cannot_share_is_refused_at_submit_naming_the_fields(
    api: Connection, quickstart: Path, fields: dict[str, object], named: str
) -> None:
    dataset = upload_dataset(api, quickstart)
    with pytest.raises(ConfigError) as refused:
        submit_train(api, dataset.dataset_id, trainer_pb2.TrainConfig(steps=2, **fields))
    assert refused.value.context["fields"] == named
    assert refused.value.hint


def test_a_campaign_trains_its_runs_in_one_process_each(api: Connection, quickstart: Path) -> None:
    dataset = upload_dataset(api, quickstart)
    with pytest.raises(ConfigError, match="nproc-per-node") as refused:
        submit_multi_run(
            api,
            [dataset.dataset_id],
            trainer_pb2.TrainConfig(steps=2, nproc_per_node=2),
            trainer_pb2.MultiRunConfig(runs=2),
        )
    assert refused.value.context["fields"] == "nproc_per_node"
