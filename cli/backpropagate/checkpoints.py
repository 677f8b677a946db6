"""Disk space for checkpoints you keep yourself, as the product's documentation shows it:

    from backpropagate.checkpoints import CheckpointManager, CheckpointPolicy
    manager = CheckpointManager("ckpts", CheckpointPolicy(keep_best_n=3, keep_final=True))
    manager.register(run_idx, "ckpts/run-1", val_loss=0.5)   # after each run
    manager.prune()                                          # removes the low-value ones

The runs' own checkpoints need none of this: the trainer keeps and prunes them in its store
(BACKPROPAGATE_TRAINER__KEEP_LAST_CHECKPOINTS, __KEEP_BEST_CHECKPOINTS; docs/checkpoints.md).
This is for directories a script writes (`runs save` after each run of a campaign, say): plain
files, no service, a manifest beside them so a later process goes on with the same list.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from backpropagate_api.errors import PathOutsideDirectoryError, UserError

MANIFEST = "checkpoint_manifest.json"


@dataclass(frozen=True)
class CheckpointPolicy:
    """Which checkpoints `prune` keeps: the `keep_best_n` with the lowest validation loss, the
    last one registered (`keep_final`), and with `keep_run_boundaries` the last of every run."""

    keep_best_n: int = 3
    keep_final: bool = True
    keep_run_boundaries: bool = False

    def __post_init__(self) -> None:
        if self.keep_best_n < 0:
            raise UserError(
                f"keep_best_n must be 0 or more, not {self.keep_best_n}.",
                hint="0 keeps none for its loss (the final one still stays with keep_final).",
            )


@dataclass(frozen=True)
class CheckpointEntry:
    run_idx: int
    path: str  # relative to the checkpoint directory
    val_loss: float | None
    registered_at: float
    metadata: dict[str, object] = field(default_factory=dict)


class CheckpointManager:
    """The checkpoints under `checkpoint_dir`, listed in its manifest; `prune` deletes the ones
    the policy does not keep. Only paths inside `checkpoint_dir` are taken: pruning never
    reaches outside it."""

    def __init__(self, checkpoint_dir: str | Path, policy: CheckpointPolicy | None = None) -> None:
        self.directory = Path(checkpoint_dir)
        self.policy = policy or CheckpointPolicy()
        manifest = self.directory / MANIFEST
        saved = json.loads(manifest.read_text()) if manifest.is_file() else []
        self._entries = [CheckpointEntry(**entry) for entry in saved]

    @property
    def entries(self) -> list[CheckpointEntry]:
        """Every checkpoint still on the list, in the order registered."""
        return list(self._entries)

    def register(
        self,
        run_idx: int,
        checkpoint_path: str | Path,
        val_loss: float | None = None,
        **metadata: object,
    ) -> CheckpointEntry:
        """Add a checkpoint written for run `run_idx` (a file or directory inside the
        checkpoint directory); `val_loss` ranks it, None ranks it last."""
        path = Path(checkpoint_path)
        absolute = (path if path.is_absolute() else Path.cwd() / path).resolve()
        if not absolute.is_relative_to(self.directory.resolve()):
            raise PathOutsideDirectoryError(
                f"{checkpoint_path} is not inside {self.directory}.",
                hint="Write checkpoints under the manager's directory, so pruning stays there.",
                path=str(checkpoint_path),
            )
        if not absolute.exists():
            raise UserError(f"Checkpoint {checkpoint_path} does not exist.", path=str(path))
        relative = absolute.relative_to(self.directory.resolve()).as_posix()
        entry = CheckpointEntry(run_idx, relative, val_loss, time.time(), dict(metadata))
        self._entries = [e for e in self._entries if e.path != relative] + [entry]
        self._save()
        return entry

    def kept(self) -> list[CheckpointEntry]:
        """The entries the policy keeps, in the order registered."""
        policy = self.policy
        ranked = sorted(
            (e for e in self._entries if e.val_loss is not None),
            key=lambda e: (e.val_loss, -e.registered_at),
        )
        keep = {e.path for e in ranked[: policy.keep_best_n]}
        if policy.keep_final and self._entries:
            keep.add(self._entries[-1].path)
        if policy.keep_run_boundaries:
            last_of_run = {e.run_idx: e.path for e in self._entries}
            keep.update(last_of_run.values())
        return [e for e in self._entries if e.path in keep]

    def prune(self) -> list[Path]:
        """Delete every checkpoint the policy does not keep; returns what was deleted."""
        kept = self.kept()
        removed = []
        for entry in self._entries:
            if entry in kept:
                continue
            path = self.directory / entry.path
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            removed.append(path)
        self._entries = kept
        self._save()
        return removed

    def _save(self) -> None:
        """The manifest, replaced whole: a crash leaves the old list or the new, never half."""
        self.directory.mkdir(parents=True, exist_ok=True)
        data = json.dumps([asdict(entry) for entry in self._entries], indent=2)
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{MANIFEST}.")
        with os.fdopen(handle, "w") as out:
            out.write(data)
        os.replace(temporary, self.directory / MANIFEST)
