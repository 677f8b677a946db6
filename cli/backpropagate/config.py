"""Training presets by name, as `from backpropagate.config import get_preset` hands them out.

The tables live with the trainer (services/trainer/planning/defaults.py), which applies them to
runs that name a preset; this is their read-only view for scripts that pick values from one.
"""

from __future__ import annotations

from dataclasses import dataclass

from backpropagate_api.errors import ConfigError
from backpropagate_api.training import PRESET_RUNS, TRAINING_PRESETS


@dataclass(frozen=True)
class Preset:
    name: str
    lora_r: int
    lora_alpha: int
    batch_size: int  # the effective batch: conversations per optimizer step
    learning_rate: float
    runs: int  # a multi-run campaign's length with this preset: `multi_run(runs=preset.runs)`


def get_preset(name: str) -> Preset:
    """The training preset `name` (fast, balanced, quality, fast-3b); `--preset NAME` applies
    it whole."""
    if name not in TRAINING_PRESETS:
        raise ConfigError(
            f"Unknown preset {name!r}: the presets are {', '.join(TRAINING_PRESETS)}.",
            fields="preset",
        )
    return Preset(name=name, runs=PRESET_RUNS[name], **TRAINING_PRESETS[name])
