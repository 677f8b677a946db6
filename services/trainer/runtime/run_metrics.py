"""Prometheus metrics of the runs a trainer process trains (docs/observability.md).

Totals over every run (steps, trained tokens, step times, checkpoints) never lose a count; the
state of each run in training (its step, loss, learning rate, tokens per second, samples seen,
peak memory) is a gauge labelled with its run id, removed when the run's attempt ends, so a
worker that trains run after run exports the series of the runs it is training only.
"""

from __future__ import annotations

import time
from contextlib import suppress
from types import TracebackType

from prometheus_client import Counter, Gauge, Histogram

from backpropagate_api.v1 import trainer_pb2
from backpropagate_services.common.hardware import Hardware, peak_memory_bytes
from backpropagate_services.trainer.loop.sft import LoraTraining, StepReport

STEPS = Counter("backpropagate_train_steps_total", "Optimizer steps taken, over every run.")
TOKENS = Counter(
    "backpropagate_train_tokens_total", "Trained tokens (those the loss counts), over every run."
)
STEP_SECONDS = Histogram(
    "backpropagate_train_step_seconds",
    "Wall time of an optimizer step (an evaluation after it included), over every run.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
CHECKPOINT_SECONDS = Histogram(
    "backpropagate_checkpoint_write_seconds",
    "Time to write a checkpoint to the store.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
CHECKPOINT_BYTES = Histogram(
    "backpropagate_checkpoint_size_bytes",
    "Size of a checkpoint as written to the store.",
    buckets=tuple(2.0**power for power in range(20, 38, 2)),  # 1 MiB to 64 GiB
)

RUN_STEP = Gauge("backpropagate_run_step", "The last step a run in training took.", ["run_id"])
RUN_TOTAL_STEPS = Gauge(
    "backpropagate_run_total_steps", "The steps a run in training trains for.", ["run_id"]
)
RUN_LOSS = Gauge("backpropagate_run_loss", "A run's training loss at its last step.", ["run_id"])
RUN_LEARNING_RATE = Gauge(
    "backpropagate_run_learning_rate", "The learning rate of a run's last step.", ["run_id"]
)
RUN_TOKENS_PER_SECOND = Gauge(
    "backpropagate_run_tokens_per_second",
    "Trained tokens per second of a run's last step.",
    ["run_id"],
)
RUN_STEP_SECONDS = Gauge(
    "backpropagate_run_step_seconds", "Wall time of a run's last step.", ["run_id"]
)
RUN_SAMPLES_SEEN = Gauge(
    "backpropagate_run_samples_seen", "Conversations a run has trained on so far.", ["run_id"]
)
RUN_PEAK_MEMORY = Gauge(
    "backpropagate_run_peak_memory_bytes",
    "Peak memory of a run so far: GPU memory allocated on CUDA, the process's RSS on a CPU.",
    ["run_id"],
)
RUN_GAUGES = (
    RUN_STEP,
    RUN_TOTAL_STEPS,
    RUN_LOSS,
    RUN_LEARNING_RATE,
    RUN_TOKENS_PER_SECOND,
    RUN_STEP_SECONDS,
    RUN_SAMPLES_SEEN,
    RUN_PEAK_MEMORY,
)


class RunMetrics:
    """One attempt at a run, step by step; a context manager whose exit removes the run's
    series, however the attempt ends."""

    def __init__(self, run_id: str, hardware: Hardware) -> None:
        self.run_id = run_id
        self.hardware = hardware
        self.step_started = time.monotonic()
        self.tokens_before = 0

    def __enter__(self) -> RunMetrics:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for gauge in RUN_GAUGES:
            with suppress(KeyError):  # ended before its first step
                gauge.remove(self.run_id)

    def before_step(self, training: LoraTraining) -> None:
        """The step starts now (after any pause or hold)."""
        self.step_started = time.monotonic()
        self.tokens_before = training.tokens_seen

    def after_step(self, report: StepReport, training: LoraTraining) -> None:
        seconds = time.monotonic() - self.step_started
        STEPS.inc()
        TOKENS.inc(training.tokens_seen - self.tokens_before)
        STEP_SECONDS.observe(seconds)
        for gauge, value in (
            (RUN_STEP, report.step),
            (RUN_TOTAL_STEPS, report.total_steps),
            (RUN_LOSS, report.loss),
            (RUN_LEARNING_RATE, report.learning_rate),
            (RUN_TOKENS_PER_SECOND, report.tokens_per_second),
            (RUN_STEP_SECONDS, seconds),
            (RUN_SAMPLES_SEEN, report.samples_seen),
            (RUN_PEAK_MEMORY, peak_memory_bytes(self.hardware)),
        ):
            gauge.labels(self.run_id).set(value)

    @staticmethod
    def checkpoint_written(info: trainer_pb2.CheckpointInfo) -> None:
        CHECKPOINT_SECONDS.observe(info.seconds)
        CHECKPOINT_BYTES.observe(info.size_bytes)
