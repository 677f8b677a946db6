"""Every training setting travels from the wire message to the trainer, validated with upper
bounds too, so an absurd request is refused when it is submitted, not when a worker runs it."""

from __future__ import annotations

import re

import pytest

from backpropagate_api.errors import ConfigError
from backpropagate_api.training import TrainingConfig
from backpropagate_api.v1 import trainer_pb2
from backpropagate_services.trainer.planning.config import training_config_from_proto, with_budget


def test_unset_fields_keep_the_defaults() -> None:
    assert training_config_from_proto(trainer_pb2.TrainConfig(seed=42)) == TrainingConfig()


def test_zero_is_a_value_where_it_means_something() -> None:
    message = trainer_pb2.TrainConfig(
        seed=7,
        lora_dropout=0.0,
        warmup_ratio=0.0,
        weight_decay=0.01,
        max_grad_norm=0.5,
        target_modules=["q_proj", "v_proj"],
        gradient_accumulation=2,
    )

    config = training_config_from_proto(message)

    assert (config.lora_dropout, config.warmup_ratio, config.weight_decay) == (0.0, 0.0, 0.01)
    assert (config.max_grad_norm, config.gradient_accumulation, config.seed) == (0.5, 2, 7)
    assert config.target_modules == ["q_proj", "v_proj"]


def test_absurd_values_are_refused_naming_each_field_and_its_bounds() -> None:
    message = trainer_pb2.TrainConfig(
        steps=10**9, batch_size=100_000, lora_r=1_000_000, max_length=10**7, learning_rate=5.0
    )

    with pytest.raises(ConfigError) as caught:
        training_config_from_proto(message)

    assert caught.value.code == "INPUT_CONFIG_INVALID"
    assert caught.value.context["fields"] == "steps,batch_size,learning_rate,lora_r,max_length"
    assert "batch_size must be an integer in [1, 1024], got 100000" in caught.value.message
    assert "learning_rate must be in (0, 1), got 5.0" in caught.value.message


def test_epochs_become_steps_over_the_dataset_at_submit_time() -> None:
    message = trainer_pb2.TrainConfig(epochs=2.5, batch_size=4)

    budgeted = with_budget(message, num_examples=10)

    assert budgeted.steps == 7  # ceil(2.5 * 10 / 4): the last batch of an epoch is full anyway
    assert budgeted.epochs == 2.5 and message.steps == 0  # the request itself is left alone
    assert with_budget(trainer_pb2.TrainConfig(epochs=1), num_examples=2).steps == 1
    assert with_budget(trainer_pb2.TrainConfig(steps=9), num_examples=10).steps == 9
    assert with_budget(budgeted, num_examples=10) == budgeted  # a record's config replays


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        (trainer_pb2.TrainConfig(steps=5, epochs=1), "Give --steps or --epochs, not both"),
        (trainer_pb2.TrainConfig(epochs=-1), r"epochs must be in \(0, 10000\]"),
        (trainer_pb2.TrainConfig(epochs=1e9), r"epochs must be in \(0, 10000\]"),
    ],
)
def test_a_budget_that_cannot_be_is_refused(message, complaint) -> None:
    with pytest.raises(ConfigError) as caught:
        with_budget(message, num_examples=10)
    assert re.search(complaint, f"{caught.value.message} {caught.value.hint}")
