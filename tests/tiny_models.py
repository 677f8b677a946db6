"""A tiny random Llama on the real SmolLM2 tokenizer: training that exercises every part of a
run (templating, packing, LoRA, checkpoints, records) in milliseconds per step."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def tiny_llama(tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32, the same seeded weights on every call."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        # Frozen embeddings of the usual std 0.02 keep the logits near uniform, out of LoRA's reach.
        initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def save_tiny_llama(tokenizer: PreTrainedTokenizerBase, directory: Path) -> Path:
    """The tiny Llama and `tokenizer` as a local HF directory, a base model a run can name."""
    tiny_llama(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
