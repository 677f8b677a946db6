"""The config a run trains with, settled when it is submitted and kept in its record.

Each field comes from the first of: the value given with the run; its LoRA preset
(`lora_preset`), then its training preset (`preset`); the BACKPROPAGATE_TRAINING__* and
BACKPROPAGATE_LORA__* settings; the presets those settings name (TRAINING__PRESET,
LORA__PRESET); the trainer's built-in defaults (`TrainingConfig`). With no `steps` and no
`epochs` anywhere, the budget comes from the data (`data_budget`), with the reason kept in the
record.

Keeping the settled values in the record (not the bare request) makes `runs show` tell what
trained, and `runs replay` repeat it even after the settings changed.
"""

from __future__ import annotations

import math
from typing import Any

from backpropagate_api.errors import ConfigError
from backpropagate_api.settings import Settings
from backpropagate_api.training import (
    LORA_PRESETS,
    SCALABLE_ADAPTERS,
    TRAINING_PRESETS,
    TrainingConfig,
)
from backpropagate_api.v1 import trainer_pb2
from backpropagate_services.common.hardware import Hardware, default_micro_batch
from backpropagate_services.trainer.adapters.targets import ALL_MLP
from backpropagate_services.trainer.planning.config import is_set, with_budget

# The data-driven budget: passes over the data by its size, and at least MIN_EXAMPLES_SEEN rows
# seen. Measured on SmolLM2 (docs/training.md): rows of new facts were learnt after about 480 rows
# seen (120 steps at batch 4) whether the set had 20 or 40 rows. With it, a LoRA SFT run gets,
# for what it leaves unset, the recipe that learnt such facts well enough to answer them asked
# another way without costing general answers: LoRA on the feed-forward layers only, at
# DATA_BUDGET_LEARNING_RATE. On every linear layer the facts were learnt only as memorised rows,
# at a cost in general answers; keeping part of that update (WiSE-FT) gave the answers back but
# not the facts.
EPOCHS_TINY = 8  # up to TINY_EXAMPLES
TINY_EXAMPLES = 100
EPOCHS_LARGE = 2  # from LARGE_EXAMPLES on
LARGE_EXAMPLES = 10_000
MIN_EXAMPLES_SEEN = 480
DATA_BUDGET_TARGETS = ALL_MLP
DATA_BUDGET_LEARNING_RATE = 3e-4
MAX_STEPS = 5_000  # a huge dataset is sampled, not swept: more is for --epochs / --steps


def data_budget(num_examples: int, batch_size: int) -> tuple[int, str]:
    """Optimizer steps for a run that named no budget, and why: a few epochs, more for tiny sets
    (each example is seen often enough to be learnt, MIN_EXAMPLES_SEEN rows at least), capped
    for huge ones."""
    if num_examples <= TINY_EXAMPLES:
        epochs = float(EPOCHS_TINY)
    elif num_examples >= LARGE_EXAMPLES:
        epochs = float(EPOCHS_LARGE)
    else:  # from EPOCHS_TINY down to EPOCHS_LARGE, evenly in log(size)
        position = math.log(num_examples / TINY_EXAMPLES) / math.log(LARGE_EXAMPLES / TINY_EXAMPLES)
        epochs = EPOCHS_TINY + (EPOCHS_LARGE - EPOCHS_TINY) * position
    steps = math.ceil(epochs * num_examples / batch_size)
    reason = f"{epochs:.3g} epochs of {num_examples} examples at batch {batch_size}"
    min_steps = math.ceil(MIN_EXAMPLES_SEEN / batch_size)
    if steps < min_steps:
        return min_steps, (
            f"{reason} is {steps} steps; raised to {min_steps}, {MIN_EXAMPLES_SEEN} rows seen, "
            "what a small set takes to be learnt"
        )
    if steps > MAX_STEPS:
        return MAX_STEPS, f"{reason} is {steps} steps; capped at {MAX_STEPS}"
    return steps, f"{reason}: {steps} steps"


def machine_accumulation(config: TrainingConfig, hardware: Hardware) -> int:
    """Gradient accumulation for a run that named none: micro-batches as big as this machine
    holds comfortably (`default_micro_batch`), the effective batch unchanged."""
    micro_batch = min(default_micro_batch(hardware), config.batch_size)
    return math.ceil(config.batch_size / micro_batch)


def _fill(config: trainer_pb2.TrainConfig, values: dict[str, Any]) -> None:
    """Set each field of `values` that `config` leaves at its default."""
    for name, value in values.items():
        if is_set(config, name):
            continue
        if isinstance(value, list):
            getattr(config, name).extend(value)
        else:
            setattr(config, name, value)


def _fill_presets(config: trainer_pb2.TrainConfig, lora_preset: str, preset: str) -> None:
    for name, table, kind in (
        (lora_preset, LORA_PRESETS, "lora_preset"),  # the more specific one first
        (preset, TRAINING_PRESETS, "preset"),
    ):
        if not name:
            continue
        if name not in table:
            raise ConfigError(
                f"Unknown {kind} {name!r}: the {kind}s are {', '.join(table)}.", fields=kind
            )
        _fill(config, table[name])


def settle(
    request: trainer_pb2.TrainConfig, settings: Settings, num_examples: int
) -> tuple[trainer_pb2.TrainConfig, str]:
    """The run's config with every default filled in, and the reason for its budget ("" when
    the user set it)."""
    config = trainer_pb2.TrainConfig()
    config.CopyFrom(request)
    # The run's own presets, then the settings' fields, then the settings' presets.
    named = (request.lora_preset, request.preset)
    from_settings = (settings.lora.preset or "", settings.training.preset or "")
    _fill_presets(config, *named)
    _fill(config, settings.training_defaults())
    _fill_presets(config, *from_settings)
    config.lora_preset = request.lora_preset or from_settings[0]
    config.preset = request.preset or from_settings[1]
    if config.steps or config.epochs:
        return with_budget(config, num_examples), ""
    batch_size = config.batch_size or TrainingConfig().batch_size
    trained = num_examples - round(num_examples * config.eval_split)
    config.steps, reason = data_budget(trained, batch_size)
    if _plain_lora_sft(config):
        reason += _data_budget_recipe(config)
    return config, reason


def _data_budget_recipe(config: trainer_pb2.TrainConfig) -> str:
    """Fill what the run left unset of the data budget's LoRA recipe; say what was filled."""
    filled = []
    if not is_set(config, "target_modules"):
        config.target_modules[:] = [DATA_BUDGET_TARGETS]
        filled.append(f"LoRA on the feed-forward layers ({DATA_BUDGET_TARGETS})")
    if not is_set(config, "learning_rate"):
        config.learning_rate = DATA_BUDGET_LEARNING_RATE
        filled.append(f"learning rate {DATA_BUDGET_LEARNING_RATE:g}")
    return "".join(f"; {part}" for part in filled)


def _plain_lora_sft(config: trainer_pb2.TrainConfig) -> bool:
    """Whether the run is SFT of a plain LoRA product (lora, rslora, qlora): what the data
    budget's recipe was measured on."""
    adapter = config.adapter or TrainingConfig().adapter
    return config.method in ("", "sft") and adapter in SCALABLE_ADAPTERS
