"""Random LoRA adapters for tests that need a real adapter without training one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedModel


def tiny_llama() -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama, the same every call."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def save_random_lora(
    model: PreTrainedModel, out_dir: Path, lora_b_std: float, **options: Any
) -> Path:
    """A LoRA adapter as the trainer saves one, with lora_B random instead of trained.

    peft initialises lora_B to zero (the adapter starts as a no-op); nonzero values make it
    observable without training. `model` is changed in place.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    settings = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **options}
    torch.manual_seed(0)  # peft draws lora_A from torch's global generator
    peft_model = get_peft_model(model, LoraConfig(**settings))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * lora_b_std)
    peft_model.save_pretrained(out_dir)
    return out_dir
