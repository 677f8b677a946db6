"""A LoRA adapter as per-layer factors (`slao.Adapter`), to and from what peft holds and saves.

Merging works on each adapted layer's A and B; peft keeps them as parameters named
`<layer>.lora_A.<adapter name>.weight` in a model and `<layer>.lora_A.weight` in a saved
`adapter_model.safetensors`. These functions translate between the two, so the merge never
depends on peft's naming and a campaign's merged adapter is an ordinary peft directory that
exports, chats and pushes like any run's.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from backpropagate_api.errors import ConfigError
from backpropagate_services.trainer.multirun.slao import Adapter, LayerLora

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
SIDES = (".lora_A.", ".lora_B.")


def _split(key: str) -> tuple[str, str] | None:
    """(layer, "a" or "b") of a LoRA factor's key; None for any other weight."""
    for marker, side in zip(SIDES, "ab", strict=True):
        if marker in key:
            return key.split(marker)[0], side
    return None


def factors(weights: Mapping[str, torch.Tensor]) -> Adapter:
    """The adapter's factors by layer, from a model's trainable weights or a saved file's."""
    sides: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        split = _split(key)
        if split is not None:
            sides.setdefault(split[0], {})[split[1]] = tensor.detach().cpu()
    return {layer: LayerLora(side["a"], side["b"]) for layer, side in sides.items()}


def as_parameters(
    adapter: Adapter, parameters: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The model's LoRA `parameters`, by name, holding `adapter`'s factors: what a run starts
    from. ConfigError when the adapter does not fit the model (other layers, other rank)."""
    weights = _by_name(adapter, parameters)
    for name, tensor in weights.items():
        if tensor.shape != parameters[name].shape:
            raise _mismatch(
                f"{name} is {tuple(tensor.shape)} there and {tuple(parameters[name].shape)} here"
            )
    return weights


def _by_name(adapter: Adapter, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """`adapter`'s factors under the LoRA names among `names`, which must cover its layers."""
    weights: dict[str, torch.Tensor] = {}
    for name in names:
        split = _split(name)
        if split is None:
            continue
        layer, side = split
        if layer not in adapter:
            raise _mismatch(f"it has no factors for layer {layer}")
        weights[name] = getattr(adapter[layer], side)
    covered = {split[0] for split in map(_split, weights) if split is not None}
    if covered != set(adapter):
        missing = sorted(set(adapter) - covered)[0]
        raise _mismatch(f"the model has no LoRA on layer {missing}")
    return weights


def _mismatch(why: str) -> ConfigError:
    return ConfigError(
        f"The adapter to continue from does not fit this run's LoRA: {why}.",
        hint="Continue with the same base model, --target-modules and --lora-r as before.",
        fields="target_modules,lora_r",
    )


def read_adapter_dir(directory: Path) -> Adapter:
    """The factors of a peft adapter directory."""
    return factors(load_file(str(directory / WEIGHTS_FILE)))


def write_adapter_dir(adapter: Adapter, template: Path, destination: Path) -> Path:
    """`adapter` as a peft directory shaped like `template` (a run's saved adapter): its
    config, with the rank set to the adapter's. An `average` merge is wider than one run's
    adapter; alpha is raised with the rank so the update keeps its scale (alpha / r, or
    alpha / sqrt(r) with rsLoRA)."""
    destination.mkdir(parents=True, exist_ok=True)
    for item in template.iterdir():
        if item.name not in (WEIGHTS_FILE, CONFIG_FILE) and item.is_file():
            shutil.copy2(item, destination / item.name)
    config = json.loads((template / CONFIG_FILE).read_text())
    rank = next(iter(adapter.values())).a.shape[0]
    growth = rank / config["r"]
    config["lora_alpha"] *= math.sqrt(growth) if config.get("use_rslora") else growth
    config["r"] = rank
    (destination / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    saved_names = load_file(str(template / WEIGHTS_FILE)).keys()
    save_file(
        {name: tensor.contiguous() for name, tensor in _by_name(adapter, saved_names).items()},
        str(destination / WEIGHTS_FILE),
    )
    return destination
