"""What a train worker does between two steps: events, checkpoints, and stopping when it must.

Every step's event goes out through a buffered publisher (a Redis restart does not fail the
run). Checkpoints are written every `checkpoint_every` steps, or every `checkpoint_interval`
seconds when that is 0, and always after the last step; each is written only while this worker
still holds the job's lease. Before each step the run stops if it was cancelled, if another
worker took its job over (nothing written), or if the worker is shutting down (checkpoint,
then release), and it obeys the safety sidecar (`safety_gate` decides): at critical it
checkpoints and pauses until the level has been back at warning or below for a while, at
emergency it checkpoints and stops with the reason's error code, resumable later.

In a run trained by several processes these hooks run on rank 0 alone, and the others follow
its verdict (`ranks`); while a hook holds (a pause, a drill), each poll tells them to wait on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Collection
from pathlib import Path
from typing import Protocol

import torch

from backpropagate_api.errors import DependencyError, JobCancelledError
from backpropagate_api.layout import cancel_channel
from backpropagate_api.layout import run_events_channel as events_channel
from backpropagate_api.layout import run_record_key as record_key
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.jobs import (
    Lease,
    LeaseLost,
    ReleasedForShutdown,
    StoppedForLater,
    durably,
)
from backpropagate_services.common.queue import JobQueue
from backpropagate_services.common.records import BufferedPublisher, save_record
from backpropagate_services.common.store.base import ArtifactStore
from backpropagate_services.trainer.loop.checkpoints import LOSS_WINDOW, CheckpointManager
from backpropagate_services.trainer.loop.sft import (
    EvalReport,
    LoraTraining,
    OomRecovery,
    StepReport,
    TrainingHooks,
)
from backpropagate_services.trainer.runtime.run_metrics import RunMetrics
from backpropagate_services.trainer.runtime.safety_gate import Action, Decision, SafetyGate
from backpropagate_services.trainer.runtime.safety_monitor import SafetyMonitor
from backpropagate_services.trainer.runtime.tracking import RunTracking

log = logging.getLogger(__name__)

# A paused run re-reads the level at least this often, and checks for cancel and shutdown.
PAUSE_POLL_SECONDS = 1.0


def save_while_held(lease: Lease, store: ArtifactStore, record: trainer_pb2.RunRecord) -> None:
    """Save the run record, unless another worker holds the run now (LeaseLost): never
    overwrite what the new holder wrote."""
    lease.confirm()
    durably(save_record)(store, record_key(record.run_id), record)


def job_run_id(record: trainer_pb2.RunRecord) -> str:
    """The run whose job trains `record`: its campaign's, for a campaign's run. That is the run
    to cancel or resume."""
    return record.campaign_id or record.run_id


class Stoppable(Protocol):
    @property
    def stopping(self) -> bool: ...


class RunEvents:
    """A run's events, stamped with the current safety level and the run's attempt."""

    def __init__(self, queue: JobQueue, safety: SafetyMonitor) -> None:
        self.queue = queue
        self.safety = safety
        self.publisher = BufferedPublisher(queue)
        self.tracking: RunTracking | None = None  # the experiment trackers of the run in hand

    def emit(self, record: trainer_pb2.RunRecord, **fields: object) -> None:
        event = trainer_pb2.RunEvent(
            run_id=record.run_id,
            status=record.status,
            total_steps=record.steps,
            safety_level=self.safety.level,  # type: ignore[arg-type]
            timestamp=time.time(),
            attempt=record.attempts,
            batch_size=record.batch_size,
            gradient_accumulation=record.gradient_accumulation,
            **fields,  # type: ignore[arg-type]
        )
        self.publisher.publish(events_channel(record.run_id), event)
        if record.campaign_id:  # the campaign's watchers follow its runs too
            event.campaign_id = record.campaign_id
            event.campaign_run = record.campaign_run
            self.publisher.publish(events_channel(record.campaign_id), event)
        if self.tracking is not None:
            self.tracking.observe(event)

    def cancel_cursor(self, run_id: str) -> str:
        """Where this attempt's cancel requests start: a resumed run was maybe cancelled
        before, and that request is spent."""
        earlier = durably(self.queue.read)(cancel_channel(run_id), "", 0)
        return earlier[-1].event_id if earlier else ""

    def cancel_requested(self, run_id: str, after: str) -> bool:
        """Whether the run was cancelled since `after`; a queue outage reads as "not yet"."""
        try:
            return bool(self.queue.read(cancel_channel(run_id), after, 0))
        except DependencyError:
            return False


class RunHooks(TrainingHooks):
    def __init__(
        self,
        record: trainer_pb2.RunRecord,
        events: RunEvents,
        checkpoints: CheckpointManager,
        lease: Lease,
        *,
        worker: Stoppable,
        cancel_cursor: str,
        release_on_shutdown: bool,
        checkpoint_every: int,
        checkpoint_interval: float,
        safety_gate: SafetyGate,
        metrics: RunMetrics,
        hold_at_steps: Collection[int] = (),
        hold_release_file: Path | None = None,
    ) -> None:
        self.record = record
        self.events = events
        self.checkpoints = checkpoints
        self.lease = lease
        self.worker = worker
        self.cancel_cursor = cancel_cursor
        self.release_on_shutdown = release_on_shutdown
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.gate = safety_gate
        self.metrics = metrics
        self.hold_at_steps = hold_at_steps
        self.hold_release_file = hold_release_file
        self.safety = events.safety
        self.last_checkpoint_at = time.monotonic()
        self.reward_windows: dict[str, deque[float]] = {}

    def before_step(self, step: int, training: LoraTraining) -> None:
        self._stop_if_asked(step, training)
        self._obey_safety(step, training)
        self._hold_for_drill(step, training)
        self.metrics.before_step(training)

    def _hold_for_drill(self, step: int, training: LoraTraining) -> None:
        """Fault drill (`FaultSettings.hold_at_step`): wait before the step until the run is
        stopped or the release file appears, so a drill's kill, interrupt, outage or safety
        ramp finds it mid-run however fast this machine trains. The held run obeys the safety
        sidecar as it would between two steps (a ramp pauses, resumes or stops it here). A
        campaign's runs count their steps one after another."""
        job_step = max(self.record.campaign_run - 1, 0) * self.record.steps + step
        if job_step not in self.hold_at_steps:
            return
        log.warning("fault drill: holding before step %d until released or stopped", step)
        while not self._released_by_drill():
            self._poll(step, training)
            self._obey_safety(step, training)
        log.warning("fault drill: %s released the run before step %d", self.hold_release_file, step)

    def _released_by_drill(self) -> bool:
        """Whether the release file appeared; it is deleted, so the next hold waits until the
        drill creates it again."""
        release = self.hold_release_file
        if release is None or not release.exists():
            return False
        release.unlink(missing_ok=True)
        return True

    def _poll(self, step: int, training: LoraTraining) -> None:
        """While holding before a step: wait for news from the sidecar (a second at most),
        keep the run's other processes waiting, and stop if asked."""
        self.safety.wait_for_update(PAUSE_POLL_SECONDS)
        training.ranks.keep_waiting()
        self._stop_if_asked(step, training)

    def _stop_if_asked(self, step: int, training: LoraTraining) -> None:
        """Cancelled, the job taken over, the worker shutting down: no further step."""
        self.lease.check()
        if self.events.cancel_requested(job_run_id(self.record), self.cancel_cursor):
            raise JobCancelledError(f"Cancelled before step {step} of {self.record.steps}.")
        if self.worker.stopping:
            self.checkpoint(training)
            if not self.release_on_shutdown:
                raise StoppedForLater(
                    f"checkpointed at step {training.step}; `backprop runs resume "
                    f"{job_run_id(self.record)}` goes on"
                )
            self.record.status = common_pb2.JOB_STATUS_QUEUED  # waiting for the next worker
            save_while_held(self.lease, self.checkpoints.store, self.record)
            self.events.emit(
                self.record,
                kind="released",
                step=training.step,
                message=f"worker shutting down: checkpointed at step {training.step}, "
                "released for another worker",
            )
            raise ReleasedForShutdown(f"Released before step {step}.")

    def _obey_safety(self, step: int, training: LoraTraining) -> None:
        decision = self.gate.decide(self.safety.level, self.safety.reasons)
        while decision.action in (Action.PAUSE, Action.WAIT):
            if decision.action is Action.PAUSE:
                self.checkpoint(training)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # NVML counts torch's cache as used VRAM
                self._safety_event("paused", decision, training)
            self._poll(step, training)
            decision = self.gate.decide(self.safety.level, self.safety.reasons)
        if decision.action is Action.STOP:
            self.checkpoint(training)
            assert decision.error is not None
            raise decision.error
        if decision.action is Action.RESUME:
            self._safety_event("resumed", decision, training)
        elif decision.action is Action.DEGRADED:
            self._safety_event("safety_degraded", decision, training)

    def _safety_event(self, kind: str, decision: Decision, training: LoraTraining) -> None:
        log.warning("%s", decision.message)
        self.events.emit(self.record, kind=kind, step=training.step, message=decision.message)

    def after_step(self, report: StepReport, training: LoraTraining) -> None:
        self.lease.check()
        self.metrics.after_step(report, training)
        self.record.loss_history.append(report.loss)  # kept per step: a failed run keeps its curve
        self.events.emit(
            self.record,
            kind="step",
            step=report.step,
            loss=report.loss,
            learning_rate=report.learning_rate,
            tokens_per_second=report.tokens_per_second,
            eta_seconds=report.eta_seconds,
            **self._rewards(report),
        )
        epochs = report.samples_seen // max(len(training.dataset.examples), 1)
        if epochs > self.record.epochs_completed:
            self.record.epochs_completed = epochs
            self.events.emit(self.record, kind="epoch", step=report.step, epoch=epochs)
        if self._checkpoint_due(report.step):
            self.checkpoint(training)

    def _rewards(self, report: StepReport) -> dict[str, float]:
        """A preference step's reward margin and accuracy, for its event; the record keeps their
        mean over the last steps, as a checkpoint's loss is (one step's is noisy)."""
        rewards = {
            name: value
            for name in ("reward_margin", "reward_accuracy")
            if (value := getattr(report, name)) is not None
        }
        for name, value in rewards.items():
            window = self.reward_windows.setdefault(name, deque(maxlen=LOSS_WINDOW))
            window.append(value)
            setattr(self.record, name, sum(window) / len(window))
        return rewards

    def after_eval(self, report: EvalReport, training: LoraTraining) -> None:
        self.record.evals.append(trainer_pb2.EvalPoint(step=report.step, loss=report.loss))
        if report.step:
            self.record.best_eval_loss = report.best_loss
            self.record.best_step = report.best_step
        self.events.emit(
            self.record,
            kind="eval",
            step=report.step,
            eval_loss=report.loss,
            message=f"eval loss {report.loss:.4f}"
            + (
                " (base model)"
                if not report.step
                else f", best {report.best_loss:.4f} at step {report.best_step}"
            ),
        )

    def on_oom_recovery(self, recovery: OomRecovery) -> None:
        self.record.oom_recoveries = recovery.recoveries
        self.record.batch_size = recovery.micro_batch_size
        self.record.gradient_accumulation = recovery.gradient_accumulation
        self.events.emit(
            self.record,
            kind="oom_recovered",
            step=recovery.step - 1,
            message=f"out of memory at step {recovery.step}: micro-batch halved to "
            f"{recovery.micro_batch_size} x {recovery.gradient_accumulation} accumulation "
            f"(recovery {recovery.recoveries}), taking the step again",
        )

    def _checkpoint_due(self, step: int) -> bool:
        if step == self.record.steps:
            return True
        if self.checkpoint_every:
            return step % self.checkpoint_every == 0
        return time.monotonic() - self.last_checkpoint_at >= self.checkpoint_interval

    def checkpoint(self, training: LoraTraining) -> None:
        """Write the state after the last step done (once per step), prune, save the record."""
        if training.step == 0 or training.step == self.record.last_checkpoint_step:
            return
        # Never touch what a worker that took the job over wrote: confirmed before every write,
        # and a checkpoint finished after the lease was lost (frozen mid-write) is deleted.
        self.lease.confirm()
        info = durably(self.checkpoints.save)(training.checkpoint_state(), self.record.attempts)
        try:
            self.lease.confirm()
        except LeaseLost:
            durably(self.checkpoints.discard)(info)
            raise
        kept = durably(self.checkpoints.prune)([*self.record.checkpoints, info])
        del self.record.checkpoints[:]
        self.record.checkpoints.extend(kept)
        self.record.last_checkpoint_step = info.step
        save_while_held(self.lease, self.checkpoints.store, self.record)
        self.last_checkpoint_at = time.monotonic()
        self.metrics.checkpoint_written(info)
        log.info(
            "checkpoint at step %d: %.1f MB in %.2f s",
            info.step,
            info.size_bytes / 1e6,
            info.seconds,
        )
        self.events.emit(
            self.record,
            kind="checkpoint",
            step=info.step,
            message=f"checkpoint at step {info.step} ({info.size_bytes / 1e6:.1f} MB, "
            f"{info.seconds:.1f} s)",
        )
