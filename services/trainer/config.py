"""TrainConfig (the wire message, 0 = "use the default") -> a validated TrainingConfig."""

from __future__ import annotations

from backpropagate.v1 import trainer_pb2
from backpropagate_services.trainer.lora import TrainingConfig

OVERRIDABLE = (
    "steps",
    "batch_size",
    "gradient_accumulation",
    "learning_rate",
    "lora_r",
    "lora_alpha",
    "max_length",
)


def training_config_from_proto(message: trainer_pb2.TrainConfig) -> TrainingConfig:
    """Fields left at 0 keep TrainingConfig's defaults; any other value is validated as given."""
    overrides: dict[str, float | int] = {
        name: getattr(message, name) for name in OVERRIDABLE if getattr(message, name) != 0
    }
    return TrainingConfig(seed=message.seed, **overrides).validate()  # type: ignore[arg-type]
