"""The Train page's settings: every training field, prefilled with what a run gets when it gives
none and why (the same entries `backprop config` lists: a setting, a preset, the built-in
default, or "from the data's size"), and turned back into `Trainer.train` keywords.

A field left at its prefilled value is not sent: the trainer then makes its own choice, which
is the point of the smart defaults (a budget from the data's size, a micro-batch from free
memory, the settings of the stack that trains, which may not be this process's). Only the
fields a user changed travel with the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from backpropagate.effective_config import HARDWARE_OR_DATA, Entry, training_entries
from backpropagate_api.settings import Settings
from backpropagate_api.training import ADAPTERS, CURRICULA, LR_SCHEDULERS, METHODS, TrainingConfig

PRESETS = ("", "fast", "balanced", "quality")
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "adapter": ADAPTERS,
    "lr_scheduler": LR_SCHEDULERS,
    "curriculum": CURRICULA,
    "preset": PRESETS,
    "lora_preset": PRESETS,
}
# Keywords whose value is a list, typed as comma-separated names.
LISTS = ("target_modules", "report_to")


@dataclass(frozen=True)
class FormField:
    name: str  # Trainer.train's keyword
    help: str
    default: Any  # what the input starts at; left there, the trainer decides
    reason: str  # why that is the default
    choices: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")

    @property
    def info(self) -> str:
        return f"{self.help} Default: {self.reason}."


def _shown(value: Any) -> Any:
    return ",".join(value) if isinstance(value, list) else value


def _why(entry: Entry) -> str:
    """Where a default comes from: the built-in value, a preset, or a variable that set it."""
    if entry.source in ("environment", ".env file"):
        return f"{entry.key}, from the {entry.source}"
    return entry.source


def form_fields(settings: Settings) -> list[FormField]:
    """The training fields in TrainingConfig's order, then the run's other options."""
    result = []
    entries = training_entries(settings)
    for field, entry in zip(fields(TrainingConfig), entries, strict=True):
        chosen_per_run = field.name in HARDWARE_OR_DATA  # a phrase, not a value
        default = 0 if chosen_per_run else _shown(entry.value)
        reason = f"0, {entry.value}" if chosen_per_run else f"{_shown(entry.value)} ({_why(entry)})"
        result.append(
            FormField(
                field.name, field.metadata["help"], default, reason, CHOICES.get(field.name, ())
            )
        )
    preset = settings.training.preset or ""
    lora_preset = settings.lora.preset or ""
    result += [
        FormField(
            "epochs", "Passes over the data, instead of steps.", 0.0, "0, steps decide (built-in)"
        ),
        FormField(
            "preset",
            "Fills what is not given: fast, balanced or quality.",
            preset,
            f"{preset or 'none'} (BACKPROPAGATE_TRAINING__PRESET)",
            PRESETS,
        ),
        FormField(
            "lora_preset",
            "LoRA shape: fast (r=16 on q/v), balanced, quality (r=256, all linear).",
            lora_preset,
            f"{lora_preset or 'none'} (BACKPROPAGATE_LORA__PRESET)",
            PRESETS,
        ),
        FormField(
            "checkpoint_every",
            "Steps between checkpoints; a run always checkpoints at its end.",
            0,
            "0, about every 5 minutes (built-in)",
        ),
        FormField(
            "oom_recovery",
            "On out-of-memory, halve the micro-batch and go on (up to 3 times).",
            True,
            "on (built-in)",
        ),
        FormField(
            "report_to",
            "Experiment trackers: auto, none, or tensorboard, wandb, mlflow.",
            "auto",
            "auto: every one installed where the run trains (built-in)",
        ),
        FormField(
            "nproc_per_node",
            "Processes training the run together, one per GPU.",
            0,
            "0, one (built-in)",
        ),
    ]
    return result


def _typed(field: FormField, value: Any) -> Any:
    if field.name in LISTS:
        return [name.strip() for name in str(value).split(",") if name.strip()]
    if isinstance(field.default, bool):
        return bool(value)
    if isinstance(field.default, int):
        return int(value)
    if isinstance(field.default, float):
        return float(value)
    return str(value)


def train_kwargs(form: Sequence[FormField], values: Sequence[Any]) -> dict[str, Any]:
    """The keywords for Trainer.train of the fields whose value differs from the default
    shown; an emptied number is left to the trainer too."""
    given = {}
    for field, value in zip(form, values, strict=True):
        if value is None or _typed(field, value) == _typed(field, field.default):
            continue
        given[field.name] = _typed(field, value)
    return given
