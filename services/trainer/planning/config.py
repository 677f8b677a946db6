"""TrainConfig (the wire message) -> a validated TrainingConfig.

Counts and rates where 0 is never meaningful (steps, batch size, learning rate, ...) use 0 for
"the default"; those where 0 means something (no dropout, no warmup) are proto3 `optional`, unset
for the default.
"""

from __future__ import annotations

import math
from typing import Any

from backpropagate_api.errors import ConfigError
from backpropagate_api.training import TrainingConfig
from backpropagate_api.v1 import trainer_pb2
from backpropagate_services.trainer.adapters.targets import SHORTHAND_TARGETS

ZERO_IS_DEFAULT = (
    "steps",
    "batch_size",
    "gradient_accumulation",
    "learning_rate",
    "lora_r",
    "lora_alpha",
    "max_length",
    "eval_split",
    "eval_every",
    "early_stopping_patience",
    "seed",  # 0: TrainingConfig's seed, so that a run's seed can come from the settings
    "min_tokens",
    "max_tokens",
    "perplexity_drop",
    "adapter_scale",
)
EMPTY_IS_DEFAULT = ("method", "adapter", "lr_scheduler", "curriculum")
UNSET_IS_DEFAULT = ("lora_dropout", "warmup_ratio", "weight_decay", "max_grad_norm", "beta")


MAX_EPOCHS = 10_000
MAX_PROCESSES = 64  # per machine: the GPUs of the largest nodes, with room


def check_processes(config: trainer_pb2.TrainConfig) -> None:
    """What a run trained by several processes needs (`runtime.ranks`): an SFT run (trl's
    preference trainers run in one), and at least a row of each step's batch for each."""
    processes = config.nproc_per_node
    if not 0 <= processes <= MAX_PROCESSES:
        raise ConfigError(
            f"nproc_per_node must be in [1, {MAX_PROCESSES}] (0: one), got {processes}.",
            hint="Pass --nproc-per-node with the number of GPUs to train on.",
            fields="nproc_per_node",
        )
    if processes <= 1:
        return
    if config.method not in ("", "sft"):
        raise ConfigError(
            f"--method {config.method} trains in one process; --nproc-per-node is for sft runs.",
            hint="Leave out --nproc-per-node.",
            fields="method,nproc_per_node",
        )
    batch_size = config.batch_size or TrainingConfig().batch_size
    if batch_size < processes:
        raise ConfigError(
            f"A batch of {batch_size} conversations cannot be shared by {processes} processes: "
            "each takes a share of every step's batch.",
            hint=f"Raise --batch-size to {processes} or more, or lower --nproc-per-node.",
            fields="batch_size,nproc_per_node",
        )


def with_budget(message: trainer_pb2.TrainConfig, num_examples: int) -> trainer_pb2.TrainConfig:
    """The config with `steps` worked out from `epochs` (passes over `num_examples`
    conversations, a batch a step), as the run record keeps it; unchanged without epochs."""
    if not message.epochs:
        return message
    if not 0 < message.epochs <= MAX_EPOCHS:
        raise ConfigError(
            f"epochs must be in (0, {MAX_EPOCHS}], got {message.epochs:g}.", fields="epochs"
        )
    batch_size = message.batch_size or TrainingConfig().batch_size
    steps = max(1, math.ceil(message.epochs * num_examples / batch_size))
    # A run record's config has both, agreeing: replaying it is no conflict.
    if message.steps and message.steps != steps:
        raise ConfigError(
            f"Both steps={message.steps} and epochs={message.epochs:g} were given.",
            hint="Give --steps or --epochs, not both.",
            fields="steps,epochs",
        )
    budgeted = trainer_pb2.TrainConfig()
    budgeted.CopyFrom(message)
    budgeted.steps = steps
    return budgeted


def is_set(message: trainer_pb2.TrainConfig, name: str) -> bool:
    """Whether the field holds a value of its own, not "use the default"."""
    if name in UNSET_IS_DEFAULT:
        return message.HasField(name)
    return bool(getattr(message, name))


def training_config_from_proto(message: trainer_pb2.TrainConfig) -> TrainingConfig:
    """Fields left at their default keep TrainingConfig's; any other value is validated as
    given (ConfigError naming every bad field)."""
    overrides: dict[str, Any] = {
        name: getattr(message, name) for name in ZERO_IS_DEFAULT if getattr(message, name) != 0
    }
    overrides |= {
        name: getattr(message, name) for name in EMPTY_IS_DEFAULT if getattr(message, name)
    }
    overrides |= {
        name: getattr(message, name) for name in UNSET_IS_DEFAULT if message.HasField(name)
    }
    if message.target_modules:
        targets = list(message.target_modules)
        # A shorthand is a string to peft: ["all-linear"] would name a module "all-linear".
        overrides["target_modules"] = targets[0] if targets in SHORTHAND_TARGETS else targets
    return TrainingConfig(fp8=message.fp8, **overrides).validate()
