"""LoRA dropout drawn once per input: layers reading one tensor share its mask, the keep rate
and scale are dropout's, and a seed (or a restored RNG state) gives the same masks again."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lora_adapters import tiny_llama

from backpropagate_api.training import TrainingConfig
from backpropagate_services.trainer.adapters.lora import apply_adapter
from backpropagate_services.trainer.adapters.lora_dropout import (
    InputDropout,
    _LastMasked,
    keep_mask,
)

LAYER_INPUTS = {
    "q_proj": "attention input",
    "k_proj": "attention input",
    "v_proj": "attention input",
    "o_proj": "attention output",
    "gate_proj": "mlp input",
    "up_proj": "mlp input",
    "down_proj": "mlp hidden",
}


def lora_inputs(model: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each lora_A of the first decoder layer received in one training forward pass."""
    seen: dict[str, torch.Tensor] = {}
    layer = model.base_model.model.model.layers[0]
    hooks = []
    for name, module in layer.named_modules():
        short = name.split(".")[-1]
        if short in LAYER_INPUTS and hasattr(module, "lora_A"):
            hooks.append(
                module.lora_A["default"].register_forward_hook(
                    lambda _m, args, _out, short=short: seen.__setitem__(short, args[0])
                )
            )
    model.train()
    model(input_ids=input_ids)
    for hook in hooks:
        hook.remove()
    return seen


def test_layers_reading_one_input_share_its_mask_and_others_draw_their_own() -> None:
    model = apply_adapter(tiny_llama(), TrainingConfig(lora_dropout=0.3))
    dropouts = [m for m in model.modules() if isinstance(m, InputDropout)]
    assert len(dropouts) == 2 * 7  # every adapted linear layer of both decoder layers
    seen = lora_inputs(model, torch.randint(0, 128, (2, 16)))
    for name, source in LAYER_INPUTS.items():
        for other, other_source in LAYER_INPUTS.items():
            same = seen[name] is seen[other]
            assert same == (source == other_source), (name, other)


def test_no_dropout_is_no_module() -> None:
    model = apply_adapter(tiny_llama(), TrainingConfig(lora_dropout=0.0))
    assert not [m for m in model.modules() if isinstance(m, InputDropout)]


def test_keep_rate_and_scale_are_dropouts() -> None:
    dropout = InputDropout(0.3, _LastMasked())
    ones = torch.ones(1000, 1000)
    masked = dropout(ones)
    kept = masked != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.003)
    assert torch.allclose(masked[kept], torch.full_like(masked[kept], 1 / 0.7))
    dropout.eval()
    assert dropout(ones) is ones


def test_a_new_input_or_an_in_place_change_draws_a_new_mask() -> None:
    dropout = InputDropout(0.5, _LastMasked())
    tensor = torch.ones(64, 64)
    first = dropout(tensor)
    assert dropout(tensor) is first
    tensor.add_(1)
    assert not torch.equal(dropout(tensor) != 0, first != 0)
    assert dropout(torch.ones(64, 64)) is not first


def test_masks_follow_torchs_rng_state() -> None:
    tensor = torch.ones(256, 256)
    torch.manual_seed(7)
    first = keep_mask(tensor, 0.1)
    state = torch.get_rng_state()
    second = keep_mask(tensor, 0.1)
    torch.manual_seed(7)
    assert torch.equal(keep_mask(tensor, 0.1), first)
    torch.set_rng_state(state)
    assert torch.equal(keep_mask(tensor, 0.1), second)
    assert not torch.equal(first, second)


def test_gradients_flow_through_a_shared_mask_to_each_reader() -> None:
    dropout = InputDropout(0.2, _LastMasked())
    source = torch.randn(8, 8, requires_grad=True)
    first, second = dropout(source), dropout(source)  # held, as lora_A's backward holds it
    assert first is second
    (first.sum() + 2 * second.sum()).backward()
    assert torch.allclose(source.grad, 3 * (first != 0).float() / 0.8)
