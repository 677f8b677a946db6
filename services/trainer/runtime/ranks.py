"""The processes that train one run together (torch.distributed), and the rule they live by:
rank 0 is the run's voice.

A run with `nproc_per_node` N (or a job across nodes) trains in N processes that torch's
elastic launcher (torchrun) starts and watches, each with its own device and its share of every
step's rows. They hold the same weights and take the same optimizer steps: after each step's
backward passes the trainable gradients are summed across them (one all-reduce, as DDP does),
so the run is the one a single process would train on the same global batch. Not DDP's
wrapper itself: it exchanges gradients inside the backward passes, while here each process runs
as many passes as its own packing makes, and all must agree on an out-of-memory error before
any gradient leaves. A full fine-tune is sharded instead (`loop.sharding`, FSDP2).

Rank 0 alone speaks for the run: it publishes its events, writes its checkpoints and saves its
record; the other ranks write nothing. The hooks that do those things (`run_hooks`) run on rank
0 only, and the others follow its verdict (`Ranks.led`): before and after each step rank 0
broadcasts GO, or STOP when the run ends there (cancelled, stopped by safety, released at
shutdown, failed: rank 0 records why), WAIT while it holds (a safety pause: the others wait
without a collective ever timing out) and CHECKPOINT when the others must take part in gathering
the state (sharded weights). What every rank must agree on is agreed, never assumed: an
out-of-memory error on any rank makes every rank halve its micro-batch (`total`), and a setup
that failed on any rank fails on all (`first_failure`).

A rank that dies is noticed by torch's elastic agent, which stops the others; a collective that
fails or times out (`TrainerSettings.collective_timeout_seconds`) raises `RanksLost` here. The
attempt then ends with no outcome recorded: its job is delivered again and resumes from its last
checkpoint, which holds rank 0's state, global step and data position, so N processes may go on
from a checkpoint that M wrote.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import timedelta
from enum import IntEnum
from typing import TypeVar

import torch
import torch.distributed as dist

from backpropagate_api.errors import BackpropagateError, ConfigError
from backpropagate_api.grpc_errors import as_backpropagate_error
from backpropagate_services.common.hardware import Hardware
from backpropagate_services.common.jobs import JobInterrupted

log = logging.getLogger(__name__)

T = TypeVar("T")

# What rank 0 tells the others while it has no job for them yet (a job across nodes: rank 0
# waits for one on the queue, announcing it every claim timeout so no collective times out).
IDLE = "idle"


class Verdict(IntEnum):
    """What rank 0 tells the others at a step's boundary."""

    GO = 0  # take the step, or go on after it
    WAIT = 1  # rank 0 is holding (a safety pause, a drill): ask again
    CHECKPOINT = 2  # rank 0 writes a checkpoint: gather the state with it
    STOP = 3  # the run ends here; rank 0 records why


class RunEnded(Exception):
    """On a rank other than 0: rank 0 ended the run (and records why); this rank just stops."""


class RanksLost(JobInterrupted):
    """A collective failed: a peer process is gone or hung past the timeout. Nothing is
    recorded; the attempt ends and its job is delivered again."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of a run; `Ranks()` is a run of one process,
    for which every method below does nothing or returns its input."""

    rank: int = 0
    world: int = 1

    @classmethod
    def join(cls, timeout_seconds: float) -> Ranks:
        """Join the group torchrun started this process in (RANK, WORLD_SIZE, MASTER_ADDR and
        MASTER_PORT in its environment): NCCL between GPUs, gloo for everything on the CPU."""
        cuda = torch.cuda.is_available()
        if cuda and _local_rank() < torch.cuda.device_count():  # one GPU each (on_own_device)
            torch.cuda.set_device(_local_rank())
        dist.init_process_group(
            "cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_seconds)
        )
        return cls(dist.get_rank(), dist.get_world_size())

    def leave(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def speaks(self) -> bool:
        """THE rule: whether this process publishes the run's events, writes its checkpoints
        and saves its record. Rank 0 does; the others train and write nothing."""
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's part of `items` (a step's rows, the eval set): every world-th one, from
        its rank on. Every rank sees the same `items` (one seeded order), so the parts are
        disjoint and together the whole."""
        return list(items[self.rank :: self.world])

    def total(self, *numbers: float) -> list[float]:
        """Each of `numbers` summed over the ranks (float64, so token counts stay exact)."""
        if self.world == 1:
            return list(numbers)
        summed = torch.tensor(numbers, dtype=torch.float64)
        with self._together("summing a step's numbers"):
            dist.all_reduce(summed)
        return summed.tolist()

    def most(self, number: int) -> int:
        """The largest of every rank's `number`."""
        if self.world == 1:
            return number
        largest = torch.tensor([number], dtype=torch.int64)
        with self._together("comparing counts"):
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return int(largest.item())

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum the trainable gradients over the ranks, in one all-reduce: each rank's are of
        its share's loss divided by the step's token count, so the sum is the step's gradient."""
        if self.world == 1:
            return
        held = list(parameters)
        for parameter in held:
            if parameter.grad is None:  # unused this step here, maybe not elsewhere
                parameter.grad = torch.zeros_like(parameter)
        grads = [parameter.grad for parameter in held if parameter.grad is not None]
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        with self._together("summing gradients"):
            dist.all_reduce(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def first_failure(self, error: BaseException | None) -> BackpropagateError | None:
        """Every rank's `error` (None: it went well) compared: the lowest rank's failure, the
        same on every rank, so all of them give up together and rank 0 records that error."""
        if self.world == 1:
            return None if error is None else as_backpropagate_error(error)
        mine = None if error is None else as_backpropagate_error(error)
        everyone: list[BackpropagateError | None] = [None] * self.world
        with self._together("comparing the ranks' setup"):
            dist.all_gather_object(everyone, mine)
        return next((failure for failure in everyone if failure is not None), None)

    def from_voice(self, value: T) -> T:
        """Rank 0's `value`, on every rank (what the others pass is ignored)."""
        if self.world == 1:
            return value
        box: list[T] = [value]
        with self._together("hearing rank 0"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def wait_for_orders(self) -> object | None:
        """A rank other than 0: what rank 0 hands out once it starts an attempt (see
        `worker.Orders`), or None when it has nothing for the others to do."""
        while (orders := self.from_voice(None)) == IDLE:
            pass
        return orders

    def on_own_device(self, hardware: Hardware) -> Hardware:
        """Rank 0's hardware choice (dtype, memory), on this process's own GPU: the one of
        its local rank; ConfigError where its machine has fewer GPUs than processes."""
        if self.world == 1 or not hardware.is_cuda:
            return hardware
        gpus = torch.cuda.device_count()
        if _local_rank() >= gpus:
            processes = os.environ.get("LOCAL_WORLD_SIZE", "more")
            raise ConfigError(
                f"{processes} processes on a machine with {gpus} GPUs: each needs one.",
                hint=f"Pass --nproc-per-node {gpus} or fewer.",
                fields="nproc_per_node",
            )
        return replace(hardware, device=f"cuda:{_local_rank()}")

    def led(self, decide: Callable[[], None], join_checkpoint: Callable[[], object]) -> None:
        """A step's boundary: rank 0 runs `decide` (its hooks: events, checkpoints, cancel,
        safety), then tells the others GO, or STOP if `decide` raised (re-raised here); the
        others wait for that verdict, taking part in each checkpoint rank 0 announces
        (`join_checkpoint`) meanwhile, and raise RunEnded on STOP."""
        if self.world == 1:
            decide()
            return
        if self.speaks:
            try:
                decide()
            except BaseException:
                with suppress(RanksLost):  # the others may be gone already
                    self._tell(Verdict.STOP)
                raise
            self._tell(Verdict.GO)
            return
        while (verdict := self._hear()) is not Verdict.GO:
            if verdict is Verdict.STOP:
                raise RunEnded()
            if verdict is Verdict.CHECKPOINT:
                join_checkpoint()

    def keep_waiting(self) -> None:
        """Rank 0, holding at a step's boundary: the others wait on (each call is one WAIT, so
        no collective of theirs waits long enough to time out)."""
        if self.world > 1 and self.speaks:
            self._tell(Verdict.WAIT)

    def announce_checkpoint(self) -> None:
        """Rank 0, about to gather a sharded state: the others join the gather."""
        if self.world > 1 and self.speaks:
            self._tell(Verdict.CHECKPOINT)

    def own_dropout(self, seed: int, step: int) -> None:
        """Give each rank dropout masks of its own: rank 0 keeps the run's random stream (what
        one process would draw), the others a stream seeded by the run's seed, step and rank.
        Called after the weights are initialised alike and after a restore."""
        if self.rank:
            torch.manual_seed(hash((seed, step, self.rank)) % 2**63)

    def _tell(self, verdict: Verdict) -> None:
        with self._together(f"telling the others {verdict.name}"):
            dist.broadcast(torch.tensor([int(verdict)]), src=0)

    def _hear(self) -> Verdict:
        verdict = torch.zeros(1, dtype=torch.int64)
        with self._together("waiting for rank 0's verdict"):
            dist.broadcast(verdict, src=0)
        return Verdict(int(verdict.item()))

    @contextmanager
    def _together(self, what: str) -> Iterator[None]:
        """A collective: its failure (gloo and NCCL raise RuntimeError when a peer's process
        is gone or the timeout passes) ends the attempt, recording nothing."""
        try:
            yield
        except RuntimeError as error:
            log.warning("rank %d of %d: %s failed: %s", self.rank, self.world, what, error)
            raise RanksLost(f"rank {self.rank} of {self.world}: {what} failed: {error}") from error


def _local_rank() -> int:
    """This process's rank on its machine, as torchrun numbers them."""
    return int(os.environ.get("LOCAL_RANK", "0"))


ONE_PROCESS = Ranks()
