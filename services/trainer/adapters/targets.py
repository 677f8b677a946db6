"""Which layers get LoRA, by name: peft's "all-linear", module names, a regex, and "all-mlp".

"all-mlp" is the feed-forward layers of every block and nothing else. peft has no such
shorthand, and their names differ by family (gate_proj / up_proj / down_proj in Llama, Qwen,
Mistral and SmolLM2, fc1 / fc2 in Phi, c_fc / c_proj in GPT-2), but every family keeps them in
a block named like `mlp`: the layers are found by that part of their qualified name. New facts
are stored there (the feed-forward layers act as key-value memories, Geva et al. 2021), and on
the offline default model an update kept to them learnt 20 invented facts well enough to answer
them asked another way, without the attention layers' update costing general answers
(docs/training.md).
"""

from __future__ import annotations

from collections.abc import Iterable

ALL_LINEAR = "all-linear"
ALL_MLP = "all-mlp"
MLP_BLOCKS = frozenset({"mlp", "feed_forward", "ffn"})
SHORTHAND_TARGETS = ([ALL_LINEAR], [ALL_MLP])  # as a request's repeated field holds them


def is_mlp_layer(name: str) -> bool:
    """Whether the module `name` ("model.layers.3.mlp.up_proj") sits in a feed-forward block."""
    return not MLP_BLOCKS.isdisjoint(name.split(".")[:-1])


def mlp_layers(linear_layer_names: Iterable[str]) -> list[str]:
    """The feed-forward ones of a model's linear layers, by their whole names."""
    return [name for name in linear_layer_names if is_mlp_layer(name)]
