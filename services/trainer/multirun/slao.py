"""Continual merging of LoRA adapters over a campaign of runs, each on new data: SLAO and the
variants the forgetting benchmark compares (../shared/SLAO_BENCH.md).

SLAO is Algorithm 1 of Qiao & Mahdavi 2025, "Merge before Forget: A Single LoRA Continual
Learning via Continual Merging" (arXiv 2512.23017). With PEFT's shapes, A is r x d_in and B is
d_out x r, and a layer's update is (alpha / r) B A:

    task 1: train a standard LoRA -> (A_ft1, B_ft1); A_m <- A_ft1; B_m <- B_ft1
    for task i = 2..T, for every adapted layer:
        Q, R <- reduced_QR(A_ft{i-1}^T);  Q <- Q diag(sign(diag(R)))     # sign(0) := +1
        A <- Q^T                  # the previous A's row space, orthonormal rows
        B <- B_ft{i-1}            # the last fine-tuned B, not the merged one
        fine-tune A, B on task i with a fresh optimizer -> (A_fti, B_fti)
        A_m <- A_fti              # A is replaced
        B_m <- B_m + (B_fti - B_m) / sqrt(i)     # lambda(i) = 1 / sqrt(i), lambda(1) = 1

Only the merged and the last fine-tuned adapter are kept: memory O((d_in + d_out) r) a layer.
After 4 tasks B_m weighs the fine-tuned B's of tasks 1..4 by about 0.06, 0.15, 0.29 and 0.50.

The variants (`MERGE_MODES`):
- last-merge: each task starts from B_m instead of B_ft{i-1}, lambda clamped at 0.1 (what the
  published backpropagate package does);
- no-qr: each task starts from A_ft{i-1} as it is, without the orthogonalisation;
- average: every task trains a fresh LoRA and the merge is the mean of the B_i A_i, kept exactly
  as one adapter of rank i r (the A_i stacked, the B_i side by side, each scaled by 1 / i);
- sequential: no merge, plain continued training: the baseline that forgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

MERGE_MODES = ("slao", "last-merge", "no-qr", "average", "sequential")
LAST_MERGE_MIN_WEIGHT = 0.1


@dataclass(frozen=True)
class LayerLora:
    """One adapted layer's LoRA factors: a (r x d_in) and b (d_out x r)."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def product(self) -> torch.Tensor:
        return self.b @ self.a


Adapter = dict[str, LayerLora]  # by layer name


@dataclass(frozen=True)
class MergeStep:
    """What one task's merge did: its weight lambda(i) and how far the merged update moved
    (the Frobenius norm of the change of B_m A_m over every layer)."""

    task: int
    weight: float
    change_norm: float


def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """Q^T from the reduced QR of A^T, signs fixed so that diag(R) >= 0: rows orthonormal and
    spanning A's row space (computed in float64, returned in A's dtype)."""
    q, r = torch.linalg.qr(a.T.to(torch.float64), mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return (q * signs).T.to(a.dtype)


def merge_weight(task: int, mode: str) -> float:
    """lambda(i) = 1 / sqrt(i); last-merge clamps it at LAST_MERGE_MIN_WEIGHT."""
    weight = 1 / math.sqrt(task)
    return max(weight, LAST_MERGE_MIN_WEIGHT) if mode == "last-merge" else weight


class ContinualMerge:
    """A campaign's adapters across tasks: where each task starts, and the merge after it."""

    def __init__(self, mode: str) -> None:
        if mode not in MERGE_MODES:
            raise ValueError(f"merge mode {mode!r} is none of {', '.join(MERGE_MODES)}")
        self.mode = mode
        self.tasks = 0
        self.merged: Adapter = {}
        self.last: Adapter = {}  # the last task's fine-tuned adapter

    def start(self) -> Adapter | None:
        """The adapter the next task starts from; None: a fresh LoRA initialisation."""
        if self.tasks == 0 or self.mode == "average":
            return None
        if self.mode in ("sequential", "no-qr"):
            return dict(self.last)
        b_source = self.merged if self.mode == "last-merge" else self.last
        return {
            name: LayerLora(orthonormal_rows(layer.a), b_source[name].b.clone())
            for name, layer in self.last.items()
        }

    def add(self, finetuned: Adapter) -> MergeStep:
        """Merge the adapter the task just trained into the campaign's."""
        self.tasks += 1
        task, before = self.tasks, self.merged
        if self.mode == "average":
            weight = 1 / task  # the mean of i products: the new one weighs 1 / i
        else:
            weight = 1.0 if task == 1 else merge_weight(task, self.mode)
        if task == 1 or self.mode == "sequential":
            merged = dict(finetuned)
        elif self.mode == "average":
            merged = {
                name: LayerLora(
                    torch.cat([before[name].a, layer.a]),
                    torch.cat([before[name].b * (1 - weight), layer.b * weight], dim=1),
                )
                for name, layer in finetuned.items()
            }
        else:
            merged = {
                name: LayerLora(layer.a, before[name].b + (layer.b - before[name].b) * weight)
                for name, layer in finetuned.items()
            }
        self.merged, self.last = merged, dict(finetuned)
        change = sum(
            float(torch.linalg.matrix_norm(layer.product - _product(before, name)) ** 2)
            for name, layer in merged.items()
        )
        return MergeStep(task, weight, math.sqrt(change))

    def state(self) -> dict[str, Any]:
        """Everything a campaign needs to go on merging, as plain tensors (torch.load-able with
        weights_only=True): written after every run, so a resumed campaign merges the same."""
        return {
            "mode": self.mode,
            "tasks": self.tasks,
            "merged": _plain(self.merged),
            "last": _plain(self.last),
        }

    @classmethod
    def restore(cls, state: dict[str, Any]) -> ContinualMerge:
        merge = cls(state["mode"])
        merge.tasks = state["tasks"]
        merge.merged = _layers(state["merged"])
        merge.last = _layers(state["last"])
        return merge


def _plain(adapter: Adapter) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {"a": layer.a, "b": layer.b} for name, layer in adapter.items()}


def _layers(plain: dict[str, dict[str, torch.Tensor]]) -> Adapter:
    return {name: LayerLora(sides["a"], sides["b"]) for name, sides in plain.items()}


def _product(adapter: Adapter, name: str) -> torch.Tensor | float:
    return adapter[name].product if name in adapter else 0.0
