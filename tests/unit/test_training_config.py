"""Every training setting travels from the wire message to the trainer, validated with upper
bounds too, so an absurd request is refused when it is submitted, not when a worker runs it."""

from __future__ import annotations

import pytest

from backpropagate.v1 import trainer_pb2
from backpropagate_services.common.errors import ConfigError
from backpropagate_services.trainer.config import training_config_from_proto
from backpropagate_services.trainer.lora import TrainingConfig


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
