"""TrainConfig (the wire message) -> a validated TrainingConfig.

Counts and rates where 0 is never meaningful (steps, batch size, learning rate, ...) use 0 for
"the default"; those where 0 means something (no dropout, no warmup) are proto3 `optional`, unset
for the default.
"""

from __future__ import annotations

from typing import Any

from backpropagate.v1 import trainer_pb2
from backpropagate_services.trainer.lora import TrainingConfig

ZERO_IS_DEFAULT = (
    "steps",
    "batch_size",
    "gradient_accumulation",
    "learning_rate",
    "lora_r",
    "lora_alpha",
    "max_length",
)
UNSET_IS_DEFAULT = ("lora_dropout", "warmup_ratio", "weight_decay", "max_grad_norm")


def training_config_from_proto(message: trainer_pb2.TrainConfig) -> TrainingConfig:
    """Fields left at their default keep TrainingConfig's; any other value is validated as
    given (ConfigError naming every bad field)."""
    overrides: dict[str, Any] = {
        name: getattr(message, name) for name in ZERO_IS_DEFAULT if getattr(message, name) != 0
    }
    overrides |= {
        name: getattr(message, name) for name in UNSET_IS_DEFAULT if message.HasField(name)
    }
    if message.target_modules:
        overrides["target_modules"] = list(message.target_modules)
    return TrainingConfig(seed=message.seed, **overrides).validate()
