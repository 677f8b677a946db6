"""LoRA's input dropout, drawn once per input, and fast on a CPU.

peft gives every adapted linear layer an `nn.Dropout` of its own on its input. In a decoder layer
q_proj, k_proj and v_proj read the same tensor, as do gate_proj and up_proj, so a layer draws
seven masks for four inputs and keeps seven masked copies for the backward pass. Drawing is
the cost: torch's CPU generator makes about 200 M numbers/s on a 2-core EPYC, and `bernoulli_`
took 19% of a packed SmolLM2 step at r=16 (bench/train_speed.py, profiled).

`share_lora_dropout` swaps them for `InputDropout`s that share one memo: a layer reading the very
tensor the layer before it just masked gets the same masked copy (one mask per input, as
dropout on that input would be). On a CPU the mask is 16-bit integers from numpy's PCG64, about
3x faster than torch.rand here, seeded from torch's generator, so a seeded run repeats itself
and a resumed one (torch's RNG state is in the checkpoint) draws what the uninterrupted one did.
On a GPU torch's own generator is fast, and is used.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MASK_LEVELS = 2**16  # a mask value is uniform over 0..65535; p is rounded to 1 / 65536


@dataclass
class _LastMasked:
    """The tensor masked last, held weakly (the layers that read it hold it while they run),
    and its masked copy, held here: under gradient checkpointing autograd keeps no copy, yet
    the layers reading the same tensor must share its mask, in the forward pass as in its
    recomputation, or the two would draw different masks. So one masked input outlives its
    pass, until the next is masked."""

    source: weakref.ref[torch.Tensor] | None = None
    version: int = -1
    masked: torch.Tensor | None = None

    def get(self, tensor: torch.Tensor) -> torch.Tensor | None:
        if self.source is None or self.source() is not tensor or tensor._version != self.version:
            return None
        return self.masked

    def put(self, tensor: torch.Tensor, masked: torch.Tensor) -> None:
        self.source, self.version = weakref.ref(tensor), tensor._version
        self.masked = masked


class InputDropout(nn.Dropout):
    """Dropout with probability `p`, reusing the masked copy of an input masked just before.
    An `nn.Dropout`, so code that turns dropout off by setting p = 0 (trl's preference
    trainers do) turns this off too."""

    def __init__(self, p: float, last: _LastMasked) -> None:
        super().__init__(p)
        self.last = last

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return tensor
        masked = self.last.get(tensor)
        if masked is None:
            # The boolean mask is what backward keeps: a byte an element, not a float.
            masked = (tensor * keep_mask(tensor, self.p)).mul_(1 / (1 - self.p))
            self.last.put(tensor, masked)
        return masked

    def extra_repr(self) -> str:
        return f"p={self.p}, shared"


def keep_mask(tensor: torch.Tensor, p: float) -> torch.Tensor:
    """A boolean mask of `tensor`'s shape, each element True with probability 1 - `p`."""
    if tensor.device.type != "cpu":
        return torch.rand(tensor.shape, device=tensor.device) >= p
    seed = int(torch.randint(0, 2**62, (1,)))
    draws = np.random.default_rng(seed).integers(0, MASK_LEVELS, tensor.numel(), dtype=np.uint16)
    return torch.from_numpy(draws >= round(p * MASK_LEVELS)).view(tensor.shape)


def share_lora_dropout(model: nn.Module) -> None:
    """Replace every peft LoRA dropout of `model` by an `InputDropout` sharing one memo, in
    place."""
    last = _LastMasked()
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                dropouts[name] = InputDropout(dropout.p, last)
