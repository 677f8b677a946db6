"""Checkpoints of a training run: what one holds, how it is written, which ones are kept.

A checkpoint holds everything needed to go on as if the run had never stopped: the trained
weights (the adapter, or every weight of a full fine-tune), optimizer and scheduler state, the
RNG states (dropout), the data-order position, the loss history, the step and the micro-batch
size in use (an OOM recovery may have shrunk it), and with an eval set the eval losses so far
and the best weights. Resuming from it and training on gives, step for step, the weights an
uninterrupted run gives.

It is written with the store's `put_dir`, which writes the manifest last: a checkpoint without
a manifest (the worker died while writing it) is never listed, so a reader sees a whole
checkpoint or none; one whose writing failed (a full disk: RUNTIME_DISK_FULL) is removed at
once. `CheckpointPolicy` says which ones to keep: the last K, for resuming, and the best N by
loss, for keeping the best adapter when a run overfits late.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backpropagate_api.disk_full import reported_as_disk_full
from backpropagate_api.errors import CheckpointInvalidError, DependencyError
from backpropagate_api.layout import checkpoint_prefix, checkpoints_prefix
from backpropagate_api.v1 import trainer_pb2
from backpropagate_services.common.store.base import MANIFEST, ArtifactStore

STATE_FILE = "state.pt"
INFO_FILE = "checkpoint.json"
LOSS_WINDOW = 10  # a checkpoint's loss: the mean of this many last steps, one step is noisy


@dataclass
class TrainingState:
    """A run between two optimizer steps, as plain tensors and numbers (torch.load-able with
    weights_only=True: no pickled code)."""

    step: int  # optimizer steps done
    loss_history: list[float]
    tokens_seen: int
    micro_batch_size: int
    adapter: dict[str, torch.Tensor]  # the trainable weights, by parameter name
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    data_order: dict[str, Any]  # the batch sampler's RNG state and its pending indices
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]
    # With an eval set: (step, eval loss) so far, the best weights and evals since they were best.
    evals: list[tuple[int, float]] = field(default_factory=list)
    best_weights: dict[str, torch.Tensor] | None = None
    evals_since_best: int = 0

    @property
    def recent_loss(self) -> float:
        window = self.loss_history[-LOSS_WINDOW:]
        return sum(window) / len(window) if window else float("inf")


@dataclass(frozen=True)
class CheckpointPolicy:
    """Keep the `keep_last` newest checkpoints and the `keep_best` ones with the lowest loss."""

    keep_last: int = 2
    keep_best: int = 1

    def kept(
        self, checkpoints: list[trainer_pb2.CheckpointInfo]
    ) -> list[trainer_pb2.CheckpointInfo]:
        """The checkpoints to keep, in step order."""
        by_step = sorted(checkpoints, key=lambda info: info.step)
        newest = by_step[-self.keep_last :] if self.keep_last else []
        best = sorted(by_step, key=lambda info: (info.loss, -info.step))[: self.keep_best]
        keep = {info.step for info in [*newest, *best]}
        return [info for info in by_step if info.step in keep]


class CheckpointManager:
    """Writes, lists, loads and prunes one run's checkpoints in the artifact store."""

    def __init__(self, store: ArtifactStore, run_id: str, policy: CheckpointPolicy) -> None:
        self.store = store
        self.run_id = run_id
        self.policy = policy

    def save(self, state: TrainingState, attempt: int) -> trainer_pb2.CheckpointInfo:
        """Write `state` as attempt `attempt`'s checkpoint of its step (manifest last)."""
        started = time.monotonic()
        prefix = checkpoint_prefix(self.run_id, state.step, attempt)
        with tempfile.TemporaryDirectory(prefix="bp-checkpoint-") as tmp:
            directory = Path(tmp)
            with reported_as_disk_full(directory.parent):
                # Through Python's file object, so a full disk's OSError (its errno) reaches us,
                # at worst as the context of torch's own error; writing to a path itself, torch
                # says only "unexpected pos".
                with (directory / STATE_FILE).open("wb") as handle:
                    torch.save(vars(state), handle)
                size = (directory / STATE_FILE).stat().st_size
                info = trainer_pb2.CheckpointInfo(
                    step=state.step, loss=state.recent_loss, key=prefix, size_bytes=size
                )
                # Written inside the directory too, so listing needs no run record.
                (directory / INFO_FILE).write_text(
                    json.dumps({"step": state.step, "loss": info.loss})
                )
            self._commit(prefix, directory)
        info.seconds = time.monotonic() - started
        info.created_at = time.time()
        return info

    def _commit(self, prefix: str, directory: Path) -> None:
        """Upload the checkpoint; if that fails (a full disk), remove what was uploaded, so no
        part of it stays in the store."""
        try:
            self.store.put_dir(prefix, directory)
        except BaseException:
            with suppress(DependencyError):  # the store is away: the next prune removes it
                self.store.delete_prefix(prefix + "/")
            raise

    def complete(self) -> list[str]:
        """Keys of the checkpoints whose manifest is written, in step order."""
        root = checkpoints_prefix(self.run_id) + "/"
        return sorted(
            root + name
            for name, _, rest in (
                key.removeprefix(root).partition("/") for key in self.store.list(root)
            )
            if rest == MANIFEST
        )

    def prune(
        self, checkpoints: list[trainer_pb2.CheckpointInfo]
    ) -> list[trainer_pb2.CheckpointInfo]:
        """Delete what the policy does not keep (and anything else under the run's checkpoints:
        a half-written one, or one a stalled worker wrote); returns the kept ones."""
        kept = self.policy.kept(checkpoints)
        kept_keys = {info.key for info in kept}
        root = checkpoints_prefix(self.run_id) + "/"
        on_store = {root + key.removeprefix(root).split("/", 1)[0] for key in self.store.list(root)}
        for key in sorted(on_store - kept_keys):
            self.store.delete_prefix(key + "/")
        return kept

    def discard(self, info: trainer_pb2.CheckpointInfo) -> None:
        """Delete one checkpoint (this attempt's own, written after it lost the run)."""
        self.store.delete_prefix(info.key + "/")

    def load(self, prefix: str) -> TrainingState:
        """The checkpoint at `prefix`; CheckpointInvalidError if it is incomplete or corrupt."""
        with tempfile.TemporaryDirectory(prefix="bp-checkpoint-") as tmp:
            try:
                self.store.get_dir(prefix, Path(tmp))
                fields = torch.load(Path(tmp) / STATE_FILE, weights_only=True)
                return TrainingState(**fields)
            except DependencyError:
                raise  # the store is away, the checkpoint may be fine: retried by the caller
            except Exception as exc:
                raise CheckpointInvalidError(
                    f"Checkpoint {prefix}/ of run {self.run_id} cannot be read: {exc}",
                    key=prefix,
                ) from exc
