"""A run fitted to its GPU before anything loads: the adapter, the micro-batch and gradient
checkpointing chosen from the estimated peak (`memory_estimate`), or the run refused.

On a CUDA GPU the trainer fills in what the run leaves unset, taking the first of these that
fits:
1. LoRA on the bf16 base, with the largest micro-batch that fits (gradient accumulation makes up
   the rest: the effective batch stays `batch_size`);
2. the same with gradient checkpointing, where not even one conversation a pass fits without;
3. QLoRA, the base's linear weights in 4-bit NF4: a 7B model's bf16 weights alone are about
   15 GB, so this is how a 7B model trains on a 16 GB card;
4. QLoRA with gradient checkpointing.
An adapter or a gradient accumulation the run names is kept as named. Where nothing fits, the run
is refused (RUNTIME_GPU_OOM) with the estimate and the changes that would fit.

"Fits": the estimate is at most the GPU's free memory less MEMORY_MARGIN of it, which is kept
for what the estimate does not count (the caching allocator's fragmentation, kernels'
workspaces). The plan is made when the run is submitted, where the trainer knows its GPU, and
made again by the worker before it loads the model if that worker's GPU is another one (a
stack's workers may run on other machines than its trainer service). On a CPU nothing is
planned: the micro-batch follows `defaults.machine_accumulation`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from backpropagate_api.errors import GpuOutOfMemoryError
from backpropagate_api.training import TrainingConfig
from backpropagate_api.v1 import trainer_pb2
from backpropagate_services.common.datasets import SftRow
from backpropagate_services.common.hardware import GIB, Hardware
from backpropagate_services.common.models import ModelSource
from backpropagate_services.trainer.adapters.lora import check_full_fine_tune_size
from backpropagate_services.trainer.planning.config import is_set, training_config_from_proto
from backpropagate_services.trainer.planning.memory_estimate import (
    MemoryParts,
    MicroBatch,
    ModelShape,
    estimate_memory,
    largest_micro_batches,
    source_shape,
)

MEMORY_MARGIN = 0.10
DEFAULT_ADAPTERS = ("lora", "qlora")  # in the order tried
# Rows tokenised to find the largest micro-batch: the longest by characters, which within one
# dataset are the longest by tokens, so a big dataset is not tokenised whole at submit.
LONGEST_ROWS = 256
SHORTEST_SUGGESTED_LENGTH = 128

LargestBatch = Callable[[int], MicroBatch]


@dataclass(frozen=True)
class MemoryPlan:
    adapter: str
    micro_batch: int
    gradient_accumulation: int
    gradient_checkpointing: bool
    estimate: MemoryParts
    adapter_chosen: bool
    accumulation_chosen: bool
    reason: str  # what was chosen and why, for the record and the progress line
    hardware: Hardware  # what it was planned for

    def record(self) -> trainer_pb2.MemoryPlan:
        return trainer_pb2.MemoryPlan(
            device=self.hardware.device,
            device_name=self.hardware.name,
            device_total_bytes=self.hardware.total_memory,
            available_bytes=self.hardware.free_memory,
            estimate_bytes=self.estimate.total_bytes,
            adapter_chosen=self.adapter_chosen,
            accumulation_chosen=self.accumulation_chosen,
            gradient_checkpointing=self.gradient_checkpointing,
            reason=self.reason,
        )


def usable_bytes(hardware: Hardware) -> int:
    return int(hardware.free_memory * (1 - MEMORY_MARGIN))


def micro_batch_sizes(batch_size: int) -> list[int]:
    """The micro-batches a step of `batch_size` rows can be split into, largest first: one for
    each number of passes that gives a different size."""
    sizes = {math.ceil(batch_size / passes) for passes in range(1, batch_size + 1)}
    return sorted(sizes, reverse=True)


def plan_memory(
    shape: ModelShape,
    config: TrainingConfig,
    hardware: Hardware,
    largest: LargestBatch,
    *,
    adapter_given: bool,
    accumulation_given: bool,
) -> MemoryPlan:
    """The first way, in the module's order, that `config`'s run fits on `hardware`'s GPU;
    `largest(rows)` is the largest micro-batch of that many rows the run can draw."""
    usable = usable_bytes(hardware)
    adapters = [config.adapter] if adapter_given else list(_default_adapters(config))
    sizes = (
        [math.ceil(config.batch_size / config.gradient_accumulation)]
        if accumulation_given
        else micro_batch_sizes(config.batch_size)
    )
    smallest: dict[str, MemoryParts] = {}  # each adapter's least-memory setup, as tried
    for adapter in adapters:
        candidate = replace(config, adapter=adapter)
        for checkpointing in (False, True):
            for micro_batch in sizes:
                estimate = estimate_memory(
                    shape,
                    candidate,
                    hardware,
                    largest(micro_batch),
                    gradient_checkpointing=checkpointing,
                )
                if estimate.total_bytes <= usable:
                    passes = math.ceil(config.batch_size / micro_batch)
                    return MemoryPlan(
                        adapter=adapter,
                        micro_batch=micro_batch,
                        gradient_accumulation=passes,
                        gradient_checkpointing=checkpointing,
                        estimate=estimate,
                        adapter_chosen=not adapter_given,
                        accumulation_chosen=not accumulation_given,
                        reason=_reason(
                            adapter,
                            micro_batch,
                            passes,
                            checkpointing,
                            estimate,
                            smallest,
                            hardware,
                        ),
                        hardware=hardware,
                    )
        smallest[adapter] = estimate
    raise _refusal(shape, config, hardware, largest, smallest, sizes[-1])


def _default_adapters(config: TrainingConfig) -> tuple[str, ...]:
    """QLoRA's 4-bit base and FP8 compute are two ways of storing the weights: not both."""
    return ("lora",) if config.fp8 else DEFAULT_ADAPTERS


def _reason(
    adapter: str,
    micro_batch: int,
    passes: int,
    checkpointing: bool,
    estimate: MemoryParts,
    smallest: dict[str, MemoryParts],
    hardware: Hardware,
) -> str:
    said = []
    if adapter == "qlora" and "lora" in smallest:
        said.append(
            f"QLoRA chosen: LoRA on the {hardware.compute_dtype} base needs at least "
            f"{gib(smallest['lora'].total_bytes)}"
        )
    said.append(f"micro-batch {micro_batch}, {passes} pass{'es' if passes > 1 else ''} a step")
    if checkpointing:
        said.append("gradient checkpointing on: nothing fits without it")
    said.append(
        f"estimated peak {gib(estimate.total_bytes)} of {gib(usable_bytes(hardware))} usable on "
        f"{hardware.name} ({gib(hardware.free_memory)} free, {MEMORY_MARGIN:.0%} kept back)"
    )
    return "; ".join(said)


def _refusal(
    shape: ModelShape,
    config: TrainingConfig,
    hardware: Hardware,
    largest: LargestBatch,
    smallest: dict[str, MemoryParts],
    micro_batch: int,
) -> GpuOutOfMemoryError:
    cheapest = min(smallest, key=lambda adapter: smallest[adapter].total_bytes)
    needed = smallest[cheapest].total_bytes
    cheapest_config = replace(config, adapter=cheapest)
    options = _options_that_fit(shape, cheapest_config, hardware, largest, smallest, micro_batch)
    return GpuOutOfMemoryError(
        f"This run does not fit on {hardware.name}: its smallest setup ({cheapest}, micro-batch "
        f"{micro_batch}, gradient checkpointing) needs about {gib(needed)}, and "
        f"{gib(usable_bytes(hardware))} of the GPU's {gib(hardware.free_memory)} free is usable "
        f"({MEMORY_MARGIN:.0%} kept back).",
        hint=(
            "These would fit: " + "; ".join(options) + "."
            if options
            else "Pick a smaller model, or free GPU memory (nvidia-smi lists what holds it)."
        ),
        estimate_bytes=needed,
        usable_bytes=usable_bytes(hardware),
    )


def _options_that_fit(
    shape: ModelShape,
    cheapest: TrainingConfig,
    hardware: Hardware,
    largest: LargestBatch,
    tried: dict[str, MemoryParts],
    micro_batch: int,
) -> list[str]:
    """What a user can change that fits, each with one conversation a pass and gradient
    checkpointing: a gradient accumulation that makes it one conversation (where the run named
    one that makes more, `micro_batch`), an adapter the plan could not choose itself, or the
    longest max_length that fits with the cheapest adapter tried."""
    usable = usable_bytes(hardware)
    one_row = largest(1)

    def smallest(candidate: TrainingConfig) -> MemoryParts:
        length = min(one_row.length, candidate.max_length)  # rows are cut at max_length
        batch = MicroBatch(1, length, min(one_row.trained_positions, length - 1))
        return estimate_memory(shape, candidate, hardware, batch, gradient_checkpointing=True)

    options = []
    one_a_pass = smallest(cheapest)
    if micro_batch > 1 and one_a_pass.total_bytes <= usable:
        passes = cheapest.batch_size
        options.append(f"--gradient-accumulation {passes} ({gib(one_a_pass.total_bytes)})")
    for adapter in _default_adapters(cheapest):
        estimate = smallest(replace(cheapest, adapter=adapter))
        if adapter not in tried and estimate.total_bytes <= usable:
            options.append(f"--adapter {adapter} ({gib(estimate.total_bytes)})")
    length = cheapest.max_length // 2
    while length >= one_row.length:  # no shorter than the rows: cutting nothing saves nothing
        length //= 2
    while length >= SHORTEST_SUGGESTED_LENGTH:
        estimate = smallest(replace(cheapest, max_length=length))
        if estimate.total_bytes <= usable:
            options.append(f"--max-length {length} ({gib(estimate.total_bytes)})")
            break
        length //= 2
    return options


def gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def longest_rows(rows: Sequence[SftRow], count: int) -> list[SftRow]:
    """The `count` rows with the most characters (see LONGEST_ROWS)."""
    return heapq.nlargest(count, rows, key=_characters)


def _characters(row: SftRow) -> int:
    if isinstance(row, str):
        return len(row)
    return sum(len(value) for message in row for value in message.values())


def fit_to_gpu(
    settled: trainer_pb2.TrainConfig,
    source: ModelSource,
    cache_dir: Path,
    hardware: Hardware,
    rows: Sequence[SftRow] | None,
) -> MemoryPlan | None:
    """Fill in, in place, what `settled` leaves to the trainer for `hardware`'s GPU, and say how;
    None on a CPU, where nothing is planned. `rows`: the run's training rows (None: every row
    max_length tokens long)."""
    if not hardware.is_cuda:
        return None
    hardware = replace(hardware, free_memory=hardware.free_memory + own_gpu_cache(hardware))
    config = training_config_from_proto(settled)
    shape = source_shape(source, cache_dir)
    if config.adapter == "full":
        check_full_fine_tune_size(shape.parameters)
    if rows is not None:
        rows = longest_rows(rows, max(LONGEST_ROWS, config.batch_size))
    plan = plan_memory(
        shape,
        config,
        hardware,
        largest_micro_batches(source, cache_dir, config, rows),
        adapter_given=is_set(settled, "adapter"),
        accumulation_given=is_set(settled, "gradient_accumulation"),
    )
    settled.adapter = plan.adapter
    settled.gradient_accumulation = plan.gradient_accumulation
    return plan


def own_gpu_cache(hardware: Hardware) -> int:
    """What this process's CUDA allocator holds: the last run's cached blocks, or the memory of
    the run training now, which it gives back before the next run starts (a trainer trains one
    run at a time on its GPU). Not in the GPU's free memory, yet there for the next run."""
    import torch

    return int(torch.cuda.memory_reserved(hardware.device))


def planned_for(plan: trainer_pb2.MemoryPlan, hardware: Hardware) -> bool:
    """Whether `plan` was made for this very kind of device: the same GPU model and size."""
    return (plan.device, plan.device_name, plan.device_total_bytes) == (
        hardware.device,
        hardware.name,
        hardware.total_memory,
    )


def fit_again_if_moved(
    record: trainer_pb2.RunRecord,
    source: ModelSource,
    cache_dir: Path,
    hardware: Hardware,
    rows: Sequence[SftRow] | None,
) -> None:
    """Plan `record`'s run again, in place, where it was planned for another GPU or, submitted
    where there was none, not at all: what the earlier plan chose is set aside first, what the
    run named stays. A run that goes on from a checkpoint keeps its plan (its adapter and
    micro-batch are in the checkpoint)."""
    planned = record.HasField("memory_plan")
    if record.last_checkpoint_step or (
        planned_for(record.memory_plan, hardware) if planned else not hardware.is_cuda
    ):
        return
    if record.memory_plan.adapter_chosen:
        record.config.ClearField("adapter")
    if record.memory_plan.accumulation_chosen:
        record.config.ClearField("gradient_accumulation")
    record.ClearField("memory_plan")
    plan = fit_to_gpu(record.config, source, cache_dir, hardware, rows)
    if plan is not None:
        record.memory_plan.CopyFrom(plan.record())
