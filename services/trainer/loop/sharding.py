"""Full fine-tuning in several processes: every weight, gradient and optimizer moment sharded
over them with FSDP2 (`torch.distributed.fsdp.fully_shard`), so each holds a 1/N share.

Each decoder layer is a unit of its own (its weights gathered just before it runs, freed just
after), the rest (embeddings, final norm, head) the root's. FSDP's collectives run inside
every forward and backward pass, so every process must run as many passes as the others
(`evened`), and the gradients it reduces are summed, not averaged: each process's loss is
already its share of the step's mean, as for adapters (`runtime.ranks`).

A checkpoint holds the whole weights and optimizer state, gathered (`full_weights`,
`full_optimizer_state`) in the layout one process writes, so a run checkpointed by N processes
goes on in M; every process loads the whole and keeps its shard (`load_full_*`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from backpropagate_services.trainer.runtime.ranks import Ranks

WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: torch.nn.Module) -> None:
    """Shard `model` in place: each decoder layer (the model's `_no_split_modules`), then the
    root, each reducing its gradients by their plain sum (gloo has no pre-scaled one)."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)


def evened(batches: Sequence[Any], ranks: Ranks) -> list[tuple[Any, float]]:
    """`batches` with their weight in the loss (1), padded to the most any process has with
    repeats of the last one weighted 0: passes that only take part in FSDP's collectives."""
    most = ranks.most(len(batches))
    return [(batch, 1.0) for batch in batches] + [(batches[-1], 0.0)] * (most - len(batches))


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable weight, whole, on the CPU (each process gathers them: a collective)."""
    return {
        name: parameter.full_tensor().detach().cpu()
        if isinstance(parameter, DTensor)
        else parameter.detach().cpu().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


@torch.no_grad()
def load_full_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Set the weights from whole tensors, each process keeping its shard (a collective)."""
    parameters = dict(model.named_parameters())
    for name, tensor in weights.items():
        parameter = parameters[name]
        if isinstance(parameter, DTensor):
            whole = tensor.to(parameter.device, parameter.dtype)
            tensor = distribute_tensor(whole, parameter.device_mesh, parameter.placements)
        parameter.copy_(tensor)


def full_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, names: list[str]
) -> dict[str, Any]:
    """The whole optimizer state (a collective), as `optimizer.state_dict()` gives it in one
    process: by parameter index, in the order of `names` (the trainable parameters')."""
    whole: dict[str, Any] = dict(get_optimizer_state_dict(model, optimizer, options=WHOLE))
    index = {name: position for position, name in enumerate(names)}
    return {
        "state": {index[name]: state for name, state in whole.get("state", {}).items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in whole.get("param_groups", [])
        ],
    }


def load_full_optimizer_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    names: list[str],
) -> None:
    """Load a whole optimizer state of `full_optimizer_state`'s layout, each process keeping
    its shard."""
    by_name: dict[str, Any] = {
        "state": {names[position]: moments for position, moments in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[position] for position in group["params"]]}
            for group in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=by_name, options=StateDictOptions(full_state_dict=True)
    )
