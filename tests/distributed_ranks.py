"""Runs of the training loop in several processes on this CPU (gloo), as torchrun's processes
run them, for tests that compare them with one process: `train_in_ranks` starts the processes
and returns what each one's run ended with."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import tiny_llama
from torch.distributed.tensor import DTensor

from backpropagate_api.training import TrainingConfig
from backpropagate_services.trainer.loop.checkpoints import TrainingState
from backpropagate_services.trainer.loop.sft import LoraTraining, TrainingHooks
from backpropagate_services.trainer.runtime.ranks import Ranks


@dataclass
class RankRun:
    """What one rank's run ended with: its loss history and trained weights, or the error that
    ended it, and the micro-batch it ran with at the end."""

    rank: int
    loss_history: list[float] = field(default_factory=list)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    state: TrainingState | None = None  # after the last step taken
    error: BaseException | None = None
    steps_done: int = 0
    micro_batch_size: int = 0
    oom_recoveries: int = 0
    held: float = 0.0  # the share of the trainable weights this process held (sharded: 1/N)


class StopAtStep(TrainingHooks):
    """Rank 0's hooks: holds a few polls before `hold_at` (the others wait meanwhile), then
    raises `error` before step `stop_at`."""

    def __init__(self, stop_at: int, error: Exception, hold_at: int = 0) -> None:
        self.stop_at = stop_at
        self.error = error
        self.hold_at = hold_at

    def before_step(self, step: int, training: LoraTraining) -> None:
        if step == self.hold_at:
            for _ in range(3):
                training.ranks.keep_waiting()
        if step == self.stop_at:
            raise self.error


def held_share(training: LoraTraining) -> float:
    """How much of its trainable weights this process holds: 1 whole, 1/N sharded."""
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in training.trainable)
    return local / sum(p.numel() for p in training.trainable)


def _rank_main(
    rank: int,
    world: int,
    init_file: str,
    tokenizer_dir: str,
    conversations: list[Any],
    config: TrainingConfig,
    options: dict[int, dict[str, Any]],
    hooks: TrainingHooks | None,
    results: str,
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    run = RankRun(rank)
    try:
        training = LoraTraining(
            tiny_llama(tokenizer),
            tokenizer,
            conversations,
            config,
            ranks=Ranks(rank, world),
            **options.get(rank, {}),
        )
        try:
            training.run(hooks if rank == 0 else None)
        except Exception as error:  # RunEnded on a rank that follows
            run.error = error
        run.loss_history = list(training.loss_history)
        run.weights = training.trained_weights()
        run.state = training.state()
        run.steps_done = training.step
        run.micro_batch_size = training.micro_batch_size
        run.oom_recoveries = training.oom_recoveries
        run.held = held_share(training)
    finally:
        Path(results, f"rank-{rank}.pickle").write_bytes(pickle.dumps(run))
        dist.destroy_process_group()


def train_in_ranks(
    world: int,
    tokenizer_dir: Path,
    conversations: list[Any],
    config: TrainingConfig,
    directory: Path,
    *,
    options: dict[int, dict[str, Any]] | None = None,
    hooks: TrainingHooks | None = None,
) -> list[RankRun]:
    """Train the tiny Llama on `conversations` in `world` processes; what each ended with.
    `options`: LoraTraining's keyword arguments by rank (a resume, an OOM drill); `hooks`:
    rank 0's."""
    results = directory / "results"
    results.mkdir(parents=True)
    mp.spawn(
        _rank_main,
        args=(
            world,
            str(directory / "rendezvous"),
            str(tokenizer_dir),
            conversations,
            config,
            options or {},
            hooks,
            str(results),
        ),
        nprocs=world,
    )
    return [pickle.loads((results / f"rank-{rank}.pickle").read_bytes()) for rank in range(world)]
