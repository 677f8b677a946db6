"""Which rows train and the first pass's order: length bounds, the perplexity filter scored with
the base model, curricula; the selection a resumed run repeats."""

from __future__ import annotations

import pytest

from backpropagate_api.errors import ConfigError
from backpropagate_api.training import TrainingConfig
from backpropagate_api.v1 import trainer_pb2
from backpropagate_services.trainer.data.selection import select_examples
from backpropagate_services.trainer.data.templating import TokenizedExample
from backpropagate_services.trainer.loop.sft import BatchSampler, LoraTraining
from tests.unit.test_adapters_and_eval import smollm2
from tests.unit.test_tracking import trainer_on_its_own_stack


def example(length: int) -> TokenizedExample:
    return TokenizedExample(list(range(length)), list(range(length)))


LENGTHS = [12, 3, 40, 8, 25]


def test_length_bounds_leave_out_short_and_long_rows_and_count_each():
    selection = select_examples(
        [example(n) for n in LENGTHS], TrainingConfig(min_tokens=5, max_tokens=30)
    )

    assert selection.kept == [0, 3, 4] and not selection.ordered
    assert (selection.too_short, selection.too_long, selection.left_out) == (1, 1, 2)


def test_the_perplexity_filter_drops_the_least_likely_fraction_scored_once():
    scored = []

    def perplexity(examples):
        scored.append(len(examples))
        return [float(len(ex.input_ids)) for ex in examples]  # longer: less likely, here

    config = TrainingConfig(perplexity_drop=0.4, curriculum="perplexity")
    selection = select_examples([example(n) for n in LENGTHS], config, perplexity)

    assert scored == [5]
    assert selection.high_perplexity == 2 and selection.kept == [1, 3, 0]  # easiest first
    assert selection.ordered


def test_a_length_curriculum_orders_the_first_pass_and_later_passes_are_shuffled():
    selection = select_examples([example(n) for n in LENGTHS], TrainingConfig(curriculum="length"))
    sampler = BatchSampler(5, batch_size=5, seed=1, first_pass_in_order=True)

    assert selection.kept == [1, 3, 0, 4, 2]
    assert sampler.next() == [0, 1, 2, 3, 4]
    assert sorted(sampler.next()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "fields",
    [
        {"min_tokens": -1},
        {"min_tokens": 10, "max_tokens": 5},
        {"perplexity_drop": 0.5},
        {"curriculum": "random"},
        {"method": "dpo", "curriculum": "length"},
    ],
    ids=["negative", "max below min", "drop half", "unknown curriculum", "preference"],
)
def test_bad_selection_settings_are_config_errors(fields):
    with pytest.raises(ConfigError) as caught:
        TrainingConfig(**fields).validate()

    assert set(caught.value.context["fields"].split(",")) & set(fields)


def conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.mark.model
def test_smollm2_finds_the_garbled_row_the_least_likely_and_the_run_leaves_it_out(smollm2_dir):
    sensible = [
        conversation(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
        for a, b in [(1, 2), (3, 4), (2, 5), (6, 1), (4, 4), (7, 2), (5, 3), (8, 1), (2, 2)]
    ]
    garbled = conversation("What is 9 plus 9?", "qz vrk ## plo 7x !! mnb zzq wfx")
    model, tokenizer = smollm2(smollm2_dir)
    config = TrainingConfig(steps=1, perplexity_drop=0.1, curriculum="perplexity", max_length=64)

    training = LoraTraining(model, tokenizer, [*sensible[:4], garbled, *sensible[4:]], config)
    _, outcome = training.run()

    assert training.selection.high_perplexity == 1 and 4 not in training.selection.kept
    assert outcome.examples_left_out == 1 and outcome.examples_trained == 9


@pytest.mark.model
def test_a_run_through_the_trainer_service_records_and_announces_what_it_left_out(
    tmp_path, model_cache, quickstart
):
    with trainer_on_its_own_stack(tmp_path / "home", model_cache) as trainer:
        run = trainer.train(quickstart, steps=1, max_tokens=90, max_length=64)
        connection = trainer.reader
        watch = trainer_pb2.WatchRunRequest(run_id=run.run_id)
        messages = [
            event.message
            for event in connection.stream("trainer", connection.trainer.WatchRun, watch)
        ]

    assert run.status == "succeeded" and run.examples_left_out > 0
    assert run.examples_trained + run.examples_left_out == 10
    assert any(f"{run.examples_left_out} over 90" in message for message in messages)
