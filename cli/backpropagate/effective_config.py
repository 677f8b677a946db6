"""`backprop config`: every setting in effect, and where each value came from.

A value comes from the environment (BACKPROPAGATE_...), from a `.env` file, or is the default.
The training section also shows what a run gets for each training field when it gives none:
a preset named by the settings, the setting itself, or the trainer's built-in default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from pydantic import BaseModel, SecretStr
from rich.table import Table

from backpropagate.render import JsonOption, console
from backpropagate_api.redaction import redact
from backpropagate_api.setting_sources import source_of
from backpropagate_api.settings import LORA_FIELD_NAMES, Settings, get_settings
from backpropagate_api.training import LORA_PRESETS, TRAINING_PRESETS, TrainingConfig

PREFIX = "BACKPROPAGATE_"
# Built-in defaults worked out per run.
HARDWARE_OR_DATA = {
    "steps": "from the data's size",
    "gradient_accumulation": "from free memory",
}


@dataclass(frozen=True)
class Entry:
    key: str  # the environment variable that sets it
    value: Any
    source: str


def _source(key: str) -> str:
    return source_of(key) or "default"


def _shown(value: Any) -> Any:
    """What may be printed of a value: never a secret, nor a password inside a URL."""
    if isinstance(value, SecretStr):
        return "********"
    return redact(value) if isinstance(value, str) else value


def settings_entries(model: BaseModel, prefix: str = PREFIX) -> list[Entry]:
    """Every leaf setting, nested groups flattened the way their variables are named."""
    entries: list[Entry] = []
    for name, value in model:
        key = f"{prefix}{name.upper()}"
        if isinstance(value, BaseModel):
            entries += settings_entries(value, key + "__")
            continue
        entries.append(Entry(key, _shown(value), _source(key)))
    return entries


def training_entries(settings: Settings) -> list[Entry]:
    """What each training field is for a run that gives no value of its own (in the order
    `defaults.settle` applies: the setting, the presets the settings name, the built-in)."""
    presets = [
        (f"lora preset {settings.lora.preset}", LORA_PRESETS.get(settings.lora.preset or "", {})),
        (
            f"preset {settings.training.preset}",
            TRAINING_PRESETS.get(settings.training.preset or "", {}),
        ),
    ]
    configured = settings.training_defaults()
    built_in = TrainingConfig()
    entries: list[Entry] = []
    for field in fields(TrainingConfig):
        name = field.name
        group, setting = (
            ("LORA", next(k for k, v in LORA_FIELD_NAMES.items() if v == name))
            if name in LORA_FIELD_NAMES.values()
            else ("LORA", name)
            if name == "target_modules"
            else ("TRAINING", name)
        )
        key = f"{PREFIX}{group}__{setting.upper()}"
        if name in configured:
            entries.append(Entry(key, configured[name], _source(key)))
            continue
        preset = next(((label, values) for label, values in presets if name in values), None)
        if preset is not None:
            entries.append(Entry(key, preset[1][name], preset[0]))
        elif name in HARDWARE_OR_DATA:
            entries.append(Entry(key, HARDWARE_OR_DATA[name], "built-in"))
        else:
            entries.append(Entry(key, getattr(built_in, name), "built-in"))
    return entries


def config_command(as_json: JsonOption = False) -> None:
    """Print the effective settings and where each came from (environment, .env, default)."""
    settings = get_settings()
    sections = {
        "settings": settings_entries(settings),
        "training defaults": training_entries(settings),
    }
    if as_json:
        print(
            json.dumps(
                {
                    section: {e.key: {"value": e.value, "source": e.source} for e in entries}
                    for section, entries in sections.items()
                },
                default=str,
                indent=2,
            )
        )
        return
    for section, entries in sections.items():
        table = Table(title=section, title_justify="left")
        table.add_column("variable", overflow="fold")
        table.add_column("value")
        table.add_column("from")
        for entry in entries:
            style = "" if entry.source in ("default", "built-in") else "bold"
            table.add_row(entry.key, str(entry.value), entry.source, style=style)
        console.print(table)
