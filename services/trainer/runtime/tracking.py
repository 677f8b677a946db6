"""Experiment trackers: a run's metrics in TensorBoard, Weights & Biases or MLflow.

A run's `report_to` names them: empty or "auto", every one whose package is importable here;
"none", no tracker; otherwise exactly those named (SubmitTrain refuses a name that is unknown or
not installed, before anything is queued). Every tracker calls the run `backprop-<run_id>`, so
the same id finds it in the dashboard, in the logs and in `backprop runs`.

The trackers are fed the run's own events (`RunEvents.emit`), so a dashboard shows the numbers
`backprop` printed: train/loss, train/learning_rate and train/tokens_per_second at every step,
train/reward_margin and train/reward_accuracy with a preference method, eval/loss at every
evaluation, train/epoch after each pass over the data. W&B and MLflow take their configuration
(project, mode, tracking URI, credentials) from their own environment variables.

A tracker that fails while the run trains (a dashboard unreachable, a full disk) is logged and
dropped: tracking never fails a training run.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf.json_format import MessageToDict

from backpropagate_api.errors import ConfigError, MissingDependencyError, quoted
from backpropagate_api.training import PREFERENCE_METHODS
from backpropagate_api.v1 import common_pb2, trainer_pb2

if TYPE_CHECKING:
    from backpropagate_services.trainer.runtime.run_hooks import RunEvents

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow")
AUTO = "auto"
NONE = "none"


def run_name(run_id: str) -> str:
    """What every tracker calls the run."""
    return f"backprop-{run_id}"


def installed(tracker: str) -> bool:
    """Whether the tracker's package can be imported here (without importing it)."""
    return importlib.util.find_spec(tracker) is not None


def not_installed(tracker: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"The experiment tracker {tracker} is not installed where the trainer runs.",
        hint=f"pip install {tracker}, or leave it out of report_to.",
    )


def resolve_report_to(report_to: Sequence[str]) -> list[str]:
    """The trackers a run's `report_to` asks for; ConfigError for an unknown name, or for a
    named tracker that is not installed."""
    names = list(dict.fromkeys(name.strip().lower() for name in report_to if name.strip()))
    if names in ([], [AUTO]):
        return [tracker for tracker in TRACKERS if installed(tracker)]
    if names == [NONE]:
        return []
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ConfigError(
            "Unknown experiment tracker(s) in report_to: "
            f"{', '.join(quoted(name) for name in unknown)}.",
            hint=f"Name some of {', '.join(TRACKERS)}, or use {AUTO} or {NONE} on its own.",
            fields="report_to",
        )
    missing = [name for name in names if not installed(name)]
    if missing:
        raise ConfigError(
            f"report_to names {', '.join(missing)}, not installed where the trainer runs.",
            hint=f"pip install {' '.join(missing)} in the trainer's environment, or leave "
            f"{'it' if len(missing) == 1 else 'them'} out of report_to ({AUTO} uses whatever "
            "is installed).",
            fields="report_to",
        )
    return names


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self, succeeded: bool) -> None: ...


class TensorBoardTracker:
    def __init__(self, log_dir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed attempt trains the steps after its checkpoint again; TensorBoard
        # then drops what the earlier attempt logged from that step on.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=10)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, succeeded: bool) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, name: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:  # installed() said it was: uninstalled since
            raise not_installed("wandb") from exc

        # create_new (wandb >= 0.19.10): each worker thread holds a run of its own.
        self.run = wandb.init(name=name, config=config, reinit="create_new")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self, succeeded: bool) -> None:
        self.run.finish(exit_code=0 if succeeded else 1)


class MlflowTracker:
    """MLflow's active run is per thread: the worker thread that trains opens, feeds and ends
    it."""

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        try:
            import mlflow
        except ImportError as exc:
            raise not_installed("mlflow") from exc

        self.mlflow = mlflow
        mlflow.start_run(run_name=name)
        mlflow.log_params(params)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self, succeeded: bool) -> None:
        self.mlflow.end_run(status="FINISHED" if succeeded else "FAILED")


def hyperparameters(record: trainer_pb2.RunRecord) -> dict[str, Any]:
    """The run's settled config and what it trains, flat, for W&B's config and MLflow's params."""
    config = MessageToDict(record.config, preserving_proto_field_name=True)
    flat = {
        name: ",".join(map(str, value)) if isinstance(value, list) else value
        for name, value in config.items()
    }
    return {"run_id": record.run_id, "base_model": record.base_model, **flat}


def event_metrics(event: trainer_pb2.RunEvent, preference: bool) -> dict[str, float]:
    """The scalars an event carries, by tracker tag (none for most kinds)."""
    if event.kind == "step":
        metrics = {
            "train/loss": event.loss,
            "train/learning_rate": event.learning_rate,
            "train/tokens_per_second": event.tokens_per_second,
        }
        if preference:
            metrics["train/reward_margin"] = event.reward_margin
            metrics["train/reward_accuracy"] = event.reward_accuracy
        return metrics
    if event.kind == "eval":
        return {"eval/loss": event.eval_loss}
    if event.kind == "epoch":
        return {"train/epoch": float(event.epoch)}
    return {}


class RunTracking:
    """The trackers of one attempt at a run, fed its events."""

    def __init__(self, record: trainer_pb2.RunRecord, tensorboard_root: Path) -> None:
        self.preference = record.config.method in PREFERENCE_METHODS
        self.trackers: dict[str, Tracker] = {}
        try:
            wanted = resolve_report_to(record.config.report_to)
        except ConfigError as exc:  # checked at submit; uninstalled since: train untracked
            log.warning("no experiment tracking for this run: %s", exc.message)
            wanted = []
        name = run_name(record.run_id)
        # A run that ran before (this is a resumed or redelivered attempt) goes on from its
        # checkpoint's step: what was logged after it is trained, and logged, again.
        purge_step = record.last_checkpoint_step + 1 if record.attempts else None
        for tracker in wanted:
            try:
                if tracker == "tensorboard":
                    self.trackers[tracker] = TensorBoardTracker(tensorboard_root / name, purge_step)
                elif tracker == "wandb":
                    self.trackers[tracker] = WandbTracker(name, hyperparameters(record))
                else:
                    self.trackers[tracker] = MlflowTracker(name, hyperparameters(record))
            except Exception:
                log.warning(
                    "%s tracking could not start; training without it", tracker, exc_info=True
                )
        if self.trackers:
            log.info("tracking as %s in %s", name, ", ".join(self.trackers))

    def observe(self, event: trainer_pb2.RunEvent) -> None:
        metrics = event_metrics(event, self.preference)
        if not metrics:
            return
        for tracker, sink in list(self.trackers.items()):
            try:
                sink.log(event.step, metrics)
            except Exception:
                log.warning(
                    "%s tracking failed; training goes on without it", tracker, exc_info=True
                )
                del self.trackers[tracker]

    def close(self, status: int) -> None:
        succeeded = status == common_pb2.JOB_STATUS_SUCCEEDED
        for tracker, sink in self.trackers.items():
            try:
                sink.close(succeeded)
            except Exception:
                log.warning("%s tracking did not close cleanly", tracker, exc_info=True)
        self.trackers.clear()


@contextmanager
def tracked(
    events: RunEvents, record: trainer_pb2.RunRecord, tensorboard_root: Path
) -> Iterator[None]:
    """Feed the events of the run `record` to its trackers until the block ends, however it
    ends; each tracker is closed as the run's final status says."""
    tracking = RunTracking(record, tensorboard_root)
    events.tracking = tracking
    try:
        yield
    finally:
        events.tracking = None
        tracking.close(record.status)
