"""Preference tuning: DPO, ORPO, SimPO and KTO move real SmolLM2 towards the chosen answers, and a
preference run resumes, splits and recovers like an SFT run, and reports its rewards.

The learning tests measure what the methods promise, independently of trl: the mean over the
pairs of log p(chosen) - log p(rejected), summed over the answer's tokens as the model's chat
template renders it, rises. The loop's promises (exact resume, gradient accumulation, OOM
recovery) are checked on the tiny random Llama of test_training_loop, where a step takes
milliseconds. One run goes through the trainer service, as `backprop train --method dpo` does.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_resume_and_oom import Recorder, assert_same_adapter
from test_training_loop import tiny_llama

from backpropagate.connection import Connection
from backpropagate.workflows import follow_run, submit_train, upload_dataset
from backpropagate_api.errors import ConfigError, DatasetEmptyError
from backpropagate_api.settings import Settings
from backpropagate_api.training import TrainingConfig
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.models import OFFLINE_DEFAULT_ALIAS, load_model, resolve_model
from backpropagate_services.common.store.local import LocalDirStore
from backpropagate_services.stack import RunningStack, start_stack
from backpropagate_services.trainer.loop.checkpoints import CheckpointManager, CheckpointPolicy
from backpropagate_services.trainer.loop.preference import PreferenceTraining, RewardReporting
from backpropagate_services.trainer.loop.sft import (
    CallbackHooks,
    LoraTraining,
    OomRecovery,
    StepReport,
    TrainingHooks,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# A one-line system prompt keeps SmolLM2's long default one out: short rows, fast steps.
SYSTEM = {"role": "system", "content": "Answer in one word."}
FACTS = [
    ("Capital of France?", "Paris.", "London."),
    ("Capital of Japan?", "Tokyo.", "Seoul."),
    ("Colour of a clear sky?", "Blue.", "Green."),
    ("Opposite of hot?", "Cold.", "Warm."),
    ("Largest planet?", "Jupiter.", "Mars."),
    ("Water freezes at how many degrees Celsius?", "Zero.", "Ten."),
    ("Fastest land animal?", "Cheetah.", "Horse."),
    ("Who wrote Hamlet?", "Shakespeare.", "Dickens."),
]


def pair(question: str, chosen: str, rejected: str) -> dict[str, Any]:
    """A row as `load_preference_rows` gives it."""
    return {
        "prompt": [SYSTEM, {"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


PAIRS = [pair(*fact) for fact in FACTS]
LABELLED = [
    {"prompt": row["prompt"], "completion": row[side], "label": side == "chosen"}
    for row in PAIRS
    for side in ("chosen", "rejected")
]


def answer_log_prob(model: Any, tokenizer: Any, prompt: list, answer: list) -> float:
    """log p(answer | prompt), summed over the answer's tokens as the chat template renders it."""
    context = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    whole = tokenizer.apply_chat_template(prompt + answer, return_dict=False)
    assert whole[: len(context)] == context
    ids = torch.tensor([whole])
    log_probs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    per_token = log_probs.gather(1, ids[0, 1:, None])[:, 0]
    return float(per_token[len(context) - 1 :].sum())


@torch.no_grad()
def chosen_margin(model: Any, tokenizer: Any) -> float:
    """Mean over PAIRS of log p(chosen) - log p(rejected): what preference tuning raises."""
    model.eval()
    return sum(
        answer_log_prob(model, tokenizer, row["prompt"], row["chosen"])
        - answer_log_prob(model, tokenizer, row["prompt"], row["rejected"])
        for row in PAIRS
    ) / len(PAIRS)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path, one_torch_thread: None) -> tuple[Any, Any, float]:
    """SmolLM2 loaded once (each test trains a copy), its tokenizer, and its chosen margin."""
    model, tokenizer = load_model(resolve_model(str(smollm2_dir)), smollm2_dir.parent, "cpu")
    return model, tokenizer, chosen_margin(model, tokenizer)


# Per method: the rows it trains on and what differs from the shared config. SimPO's beta is
# the paper's scale (its log-probabilities are per-token means). KTO's reward margin compares the
# good and bad answers of one step, which 4 random rows of 16 rarely both hold: 8 per step.
METHODS: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "dpo": (PAIRS, {}),
    "orpo": (PAIRS, {}),
    "simpo": (PAIRS, {"beta": 2.0}),
    "kto": (LABELLED, {"steps": 3, "batch_size": 8, "gradient_accumulation": 2}),
}


@pytest.mark.model
@pytest.mark.parametrize("method", list(METHODS))
def test_a_few_steps_raise_the_chosen_answers_over_the_rejected_ones(
    smollm2: tuple[Any, Any, float], method: str
) -> None:
    base, tokenizer, margin_before = smollm2
    rows, options = METHODS[method]
    config = TrainingConfig(
        **{
            "method": method,
            "steps": 4,
            "batch_size": 4,
            "learning_rate": 2e-3,
            "warmup_ratio": 0.0,
            "max_length": 64,
            **options,
        }
    )
    reports: list[StepReport] = []
    started = time.monotonic()

    training = PreferenceTraining(copy.deepcopy(base), tokenizer, rows, config)
    model, outcome = training.run(CallbackHooks(reports.append))
    seconds = time.monotonic() - started
    margin_after = chosen_margin(model, tokenizer)

    print(
        f"{method}: chosen margin {margin_before:.2f} -> {margin_after:.2f} nats; "
        f"losses {[round(r.loss, 3) for r in reports]}; reward margins "
        f"{[None if r.reward_margin is None else round(r.reward_margin, 3) for r in reports]}; "
        f"{outcome.tokens_seen / outcome.duration_seconds:.1f} answer tokens/s; {seconds:.0f} s"
    )
    assert margin_after > margin_before + 1.0
    assert [r.step for r in reports] == list(range(1, config.steps + 1))
    assert all(math.isfinite(r.loss) for r in reports)
    assert outcome.examples_trained == len(rows)
    assert (outcome.examples_dropped, outcome.examples_truncated) == (0, 0)
    margins = [r.reward_margin for r in reports if r.reward_margin is not None]
    assert margins and margins[-1] > margins[0]  # trl's own view agrees
    if method != "kto":  # trl logs no reward accuracy for KTO
        assert all(r.reward_accuracy is not None and 0 <= r.reward_accuracy <= 1 for r in reports)


# --- the loop's promises, on a tiny model ------------------------------------------------------

TINY = TrainingConfig(
    method="dpo", steps=4, batch_size=4, learning_rate=1e-2, max_length=64, seed=5
)


def tiny_training(tokenizer: Any, config: TrainingConfig = TINY, **kwargs: Any) -> Any:
    rows = LABELLED if config.method == "kto" else PAIRS
    return PreferenceTraining(tiny_llama(tokenizer), tokenizer, rows, config, **kwargs)


def test_a_resumed_preference_run_continues_exactly_where_its_checkpoint_left_off(
    smollm2_tokenizer: Any, tmp_path: Path
) -> None:
    whole = Recorder()
    uninterrupted = tiny_training(smollm2_tokenizer)
    uninterrupted.run(whole)
    interrupted = Recorder(keep_state_at=2, stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        tiny_training(smollm2_tokenizer).run(interrupted)
    manager = CheckpointManager(LocalDirStore(tmp_path), "run-1", CheckpointPolicy())
    assert interrupted.kept is not None
    saved = manager.save(interrupted.kept, attempt=1)

    resumed = tiny_training(smollm2_tokenizer, resume=manager.load(saved.key))
    after = Recorder()
    _, outcome = resumed.run(after)

    assert [report.step for report in after.reports] == [3, 4]
    assert outcome.loss_history == pytest.approx([r.loss for r in whole.reports], rel=1e-5)
    assert [r.reward_margin for r in after.reports] == pytest.approx(
        [r.reward_margin for r in whole.reports[2:]], rel=1e-4, abs=1e-6
    )
    assert_same_adapter(resumed.state().adapter, uninterrupted.state().adapter)


def test_gradient_accumulation_gives_the_steps_of_one_batch(smollm2_tokenizer: Any) -> None:
    whole = tiny_training(smollm2_tokenizer)
    whole.run()
    split = tiny_training(
        smollm2_tokenizer, TrainingConfig(**{**vars(TINY), "gradient_accumulation": 4})
    )
    split.run()

    assert split.micro_batch_size == 1
    assert split.loss_history == pytest.approx(whole.loss_history, rel=1e-5)
    # The same sums in another order: equal but for float rounding, which Adam's division by
    # the root of tiny second moments lifts to about 1e-6.
    for name, weight in whole.state().adapter.items():
        torch.testing.assert_close(split.state().adapter[name], weight, rtol=1e-4, atol=1e-5)


def test_out_of_memory_drill_halves_the_micro_batch_and_takes_the_step_again(
    smollm2_tokenizer: Any,
) -> None:
    plain = tiny_training(smollm2_tokenizer)
    plain.run()
    drilled = tiny_training(smollm2_tokenizer, oom_drill_step=2)
    hooks = Recorder()
    _, outcome = drilled.run(hooks)

    assert hooks.recoveries == [
        OomRecovery(step=2, micro_batch_size=2, gradient_accumulation=2, recoveries=1)
    ]
    assert [report.step for report in hooks.reports] == [1, 2, 3, 4]
    assert outcome.loss_history == pytest.approx(plain.loss_history, rel=1e-5)


@pytest.mark.parametrize("adapter", ["lora", "dora", "full"])
def test_the_dpo_reference_is_the_model_before_training_whatever_the_adapter(
    smollm2_tokenizer: Any, adapter: str
) -> None:
    """At the first step the trained model still is its reference, so every reward is 0."""
    config = TrainingConfig(**{**vars(TINY), "adapter": adapter, "steps": 2})
    reports: list[StepReport] = []
    training = tiny_training(smollm2_tokenizer, config)
    training.run(CallbackHooks(reports.append))

    assert reports[0].reward_margin == pytest.approx(0, abs=1e-5)
    assert reports[1].reward_margin != pytest.approx(0, abs=1e-5)
    assert "ref" not in getattr(training.model, "peft_config", {})  # no second adapter saved


def test_kto_on_pairs_trains_each_answer_as_its_own_labelled_example(
    smollm2_tokenizer: Any,
) -> None:
    config = TrainingConfig(**{**vars(TINY), "method": "kto", "steps": 2})
    training = PreferenceTraining(tiny_llama(smollm2_tokenizer), smollm2_tokenizer, PAIRS, config)
    _, outcome = training.run()

    assert outcome.examples_trained == 2 * len(PAIRS)
    assert sorted(training.dataset.examples["label"]) == [False] * 8 + [True] * 8


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_rows_whose_prompt_fills_max_length_are_dropped_and_long_answers_counted(
    smollm2_tokenizer: Any, method: str
) -> None:
    long_prompt = pair("Tell me about " + "the sea " * 40, "Waves.", "Sand.")
    long_answer = pair("Count.", "one two three " * 20, "No.")
    config = TrainingConfig(**{**vars(TINY), "method": method, "steps": 1, "max_length": 40})
    rows = [*PAIRS[:3], long_prompt, long_answer]

    training = PreferenceTraining(tiny_llama(smollm2_tokenizer), smollm2_tokenizer, rows, config)

    per_pair = 2 if method == "kto" else 1  # KTO trains each answer of a pair on its own
    assert len(training.dataset.examples) == 4 * per_pair
    assert training.dataset.dropped == per_pair
    assert training.dataset.truncated == 1


def test_a_dataset_whose_every_prompt_fills_max_length_fails_as_empty(
    smollm2_tokenizer: Any,
) -> None:
    config = TrainingConfig(**{**vars(TINY), "max_length": 8})

    with pytest.raises(DatasetEmptyError, match="None of the 8 rows"):
        PreferenceTraining(tiny_llama(smollm2_tokenizer), smollm2_tokenizer, PAIRS, config)


@pytest.mark.parametrize(
    ("method", "rows", "change", "fields"),
    [
        ("dpo", LABELLED, {}, "method"),
        ("sft", PAIRS, {}, "method"),
        ("kto", LABELLED, {"batch_size": 1}, "batch_size"),
        ("dpo", PAIRS, {"eval_split": 0.2}, "eval_split,eval_dataset_id,early_stopping_patience"),
    ],
    ids=["dpo-on-labelled", "sft-on-pairs", "kto-one-row-a-step", "dpo-with-eval"],
)
def test_what_a_preference_run_cannot_do_is_refused_before_training(
    smollm2_tokenizer: Any, method: str, rows: list, change: dict, fields: str
) -> None:
    config = TrainingConfig(**{**vars(TINY), "method": method, **change})

    with pytest.raises(ConfigError) as caught:
        PreferenceTraining(tiny_llama(smollm2_tokenizer), smollm2_tokenizer, rows, config)
    assert caught.value.context["fields"] == fields


def test_a_preference_training_sets_every_attribute_a_lora_training_has(
    smollm2_tokenizer: Any,
) -> None:
    """PreferenceTraining inherits LoraTraining's run, state and OOM recovery: whatever those
    read, its own set-up must provide."""
    sft = LoraTraining(
        tiny_llama(smollm2_tokenizer),
        smollm2_tokenizer,
        [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]],
        TrainingConfig(steps=1),
    )

    assert set(vars(sft)) <= set(vars(tiny_training(smollm2_tokenizer)))


def test_reward_reporting_passes_on_every_hook_a_run_calls() -> None:
    hooks = {name for name in vars(TrainingHooks) if not name.startswith("_")}

    assert hooks <= set(vars(RewardReporting))


# --- through the trainer service -----------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[RunningStack]:
    settings = Settings(home=tmp_path_factory.mktemp("preference-home"), model_cache=model_cache)
    running = start_stack(settings, ["dataprep", "trainer", "safety"], "127.0.0.1:0")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def connection(stack: RunningStack) -> Iterator[Connection]:
    client = Connection(dict.fromkeys(("dataprep", "trainer", "safety"), stack.address), False)
    try:
        yield client
    finally:
        client.close()


@pytest.mark.model
def test_a_dpo_run_through_the_service_succeeds_with_its_reward_margin_recorded(
    connection: Connection,
) -> None:
    dataset = upload_dataset(connection, EXAMPLES / "preference.jsonl")
    config = trainer_pb2.TrainConfig(
        base_model=OFFLINE_DEFAULT_ALIAS,
        method="dpo",
        beta=0.1,
        steps=2,
        batch_size=2,
        max_length=96,
        learning_rate=1e-3,
    )
    events: list[trainer_pb2.RunEvent] = []

    run_id = submit_train(connection, dataset.dataset_id, config)
    follow_run(connection, run_id, events.append)
    record = connection.call(
        "trainer", connection.trainer.GetRun, trainer_pb2.GetRunRequest(run_id=run_id)
    )

    assert dataset.format == "preference"
    assert record.status == common_pb2.JOB_STATUS_SUCCEEDED
    assert record.config.method == "dpo" and record.config.beta == pytest.approx(0.1)
    steps = [event for event in events if event.kind == "step"]
    assert [event.step for event in steps] == [1, 2]
    # The first step's model is the reference itself; the record keeps the mean of the steps.
    assert steps[0].reward_margin == 0 != steps[1].reward_margin
    assert record.reward_margin == pytest.approx(sum(e.reward_margin for e in steps) / 2)
    assert 0 <= record.reward_accuracy <= 1
    assert record.examples_trained == 10


@pytest.mark.parametrize(
    ("example", "method"),
    [("quickstart", "dpo"), ("preference", "sft"), ("kto", "orpo")],
)
def test_data_that_does_not_fit_the_method_is_refused_at_submit(
    connection: Connection, example: str, method: str
) -> None:
    dataset = upload_dataset(connection, EXAMPLES / f"{example}.jsonl")

    with pytest.raises(ConfigError) as caught:
        submit_train(connection, dataset.dataset_id, trainer_pb2.TrainConfig(method=method))
    assert f"method {method} cannot train on it" in caught.value.message
    assert "--method" in caught.value.hint
