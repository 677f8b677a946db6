"""Which layers get LoRA (services/trainer/adapters/targets.py): "all-mlp" is the feed-forward
layers of every block, whatever the family calls them, and a model without any is refused."""

from __future__ import annotations

import pytest
import torch
from lora_adapters import tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from backpropagate_api.errors import ConfigError
from backpropagate_api.training import TrainingConfig
from backpropagate_services.trainer.adapters.lora import apply_adapter, peft_targets
from backpropagate_services.trainer.adapters.targets import is_mlp_layer


def wrapped(model: torch.nn.Module) -> set[str]:
    """The modules peft put a LoRA on, by their names in the base model."""
    return {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and not name.endswith(("lora_A", "lora_B"))
    }


def test_all_mlp_wraps_the_feed_forward_layers_of_a_llama_and_nothing_else():
    model = apply_adapter(tiny_llama(), TrainingConfig(target_modules="all-mlp"))

    assert wrapped(model) == {
        f"model.layers.{layer}.mlp.{part}"
        for layer in range(2)
        for part in ("gate_proj", "up_proj", "down_proj")
    }


def test_all_mlp_tells_gpt2s_feed_forward_c_proj_from_its_attentions():
    """GPT-2 names a layer c_proj in both blocks: whole names keep the attention's out."""
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))

    targets = peft_targets(gpt2, "all-mlp")

    assert targets == [
        f"transformer.h.{i}.mlp.{part}" for i in range(2) for part in ("c_fc", "c_proj")
    ]
    assert not is_mlp_layer("transformer.h.0.attn.c_proj") and is_mlp_layer(targets[0])


def test_a_model_without_feed_forward_blocks_is_refused_for_all_mlp_with_a_hint():
    no_mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))

    with pytest.raises(ConfigError) as refused:
        peft_targets(no_mlp, "all-mlp")  # type: ignore[arg-type]

    assert refused.value.context["fields"] == "target_modules"
    assert "all-linear" in refused.value.hint
    assert peft_targets(no_mlp, "all-linear") == "all-linear"  # type: ignore[arg-type]
