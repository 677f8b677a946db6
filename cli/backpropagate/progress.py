"""Training and export events as they come: a rich progress bar on a terminal, plain lines
elsewhere (CI logs, nohup, pipes)."""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from backpropagate_api.v1 import common_pb2, export_pb2, trainer_pb2

SAFETY_STYLE: dict[int, str] = {
    common_pb2.SAFETY_LEVEL_SAFE: "green",
    common_pb2.SAFETY_LEVEL_WARM: "yellow",
    common_pb2.SAFETY_LEVEL_WARNING: "dark_orange",
    common_pb2.SAFETY_LEVEL_CRITICAL: "red",
    common_pb2.SAFETY_LEVEL_EMERGENCY: "bold red",
}


def safety_name(level: int) -> str:
    """The level's name (safe, warm, ... emergency); "safety ?" before the sidecar said any."""
    if level == common_pb2.SAFETY_LEVEL_UNSPECIFIED:
        return "safety ?"
    return common_pb2.SafetyLevel.Name(level).removeprefix("SAFETY_LEVEL_").lower()  # type: ignore[arg-type]


def safety_label(level: int) -> str:
    style = "dim" if level == common_pb2.SAFETY_LEVEL_UNSPECIFIED else SAFETY_STYLE.get(level)
    return f"[{style or 'white'}]{safety_name(level)}[/]"


class _Bar:
    def __init__(self, console: Console | None, *columns: object) -> None:
        self.progress = Progress(*columns, console=console or Console(stderr=True))  # type: ignore[arg-type]
        self.task: TaskID | None = None

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()


class TrainProgress(_Bar):
    """step/total, loss, learning rate, tokens/s, ETA and the GPU-safety level of each step."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__(
            console,
            TextColumn("[bold]train[/] {task.description}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f}"),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
        )

    def __call__(self, event: trainer_pb2.RunEvent) -> None:
        if self.task is None:  # a campaign's first event counts the steps of all its runs
            self.task = self.progress.add_task(
                event.run_id, total=max(event.total_steps, 1), metrics=""
            )
        metrics = event.message
        if event.step and not event.message:
            metrics = (
                f"loss {event.loss:.4f}  lr {event.learning_rate:.1e}  "
                f"{event.tokens_per_second:.0f} tok/s  eta {event.eta_seconds:.0f}s  "
                f"{safety_label(event.safety_level)}"
            )
        step = event.step
        if event.campaign_run:  # a campaign's run: its steps after those of the runs before
            step += (event.campaign_run - 1) * event.total_steps
            metrics = f"run {event.campaign_run}  {metrics}"
        self.progress.update(self.task, completed=step, metrics=metrics)


class ExportProgress(_Bar):
    """One bar over the export's stages: merge, convert, quantize, verify, smoke."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__(
            console,
            TextColumn("[bold]export[/] {task.description}"),
            BarColumn(),
            TextColumn("{task.fields[stage]}"),
            TimeElapsedColumn(),
        )

    def __call__(self, event: export_pb2.ExportEvent) -> None:
        if self.task is None:
            self.task = self.progress.add_task(event.export_id, total=5, stage="queued")
        if event.stage_count:
            self.progress.update(
                self.task,
                total=event.stage_count,
                completed=event.stage_index,
                stage=f"{event.stage}: {event.message}",
            )
        elif event.status in (common_pb2.JOB_STATUS_SUCCEEDED,):
            total = self.progress.tasks[0].total or 1
            self.progress.update(self.task, completed=total, stage="done")
        else:
            self.progress.update(self.task, stage=event.message)


class _PlainLines:
    """Progress as plain lines, for output that is no terminal (CI logs, nohup, a pipe), where
    a progress bar shows nothing until it ends: a line at once for what happens, and the latest
    state every `interval_seconds` whether or not anything happened since, so a log shows what
    runs and a watchdog that kills silent jobs does not kill a long step."""

    def __init__(self, console: Console | None, interval_seconds: float) -> None:
        self.console = console or Console(stderr=True)
        self.interval_seconds = interval_seconds
        self.latest = ""
        self._started = time.monotonic()
        self._last_line = self._started
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="progress", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def line(self, text: str) -> None:
        self._last_line = time.monotonic()
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval_seconds / 4):
            if self.latest and time.monotonic() - self._last_line >= self.interval_seconds:
                elapsed = time.monotonic() - self._started
                self.line(f"{self.latest}  ({elapsed:.0f}s elapsed)")


class PlainTrainProgress(_PlainLines):
    """The run id as soon as the run is queued, each event that is not a step at once (started,
    checkpoint, eval, paused, merged, ended, ...), and the latest step line (step, loss, lr,
    tokens/s, ETA, safety level) every interval."""

    def __call__(self, event: trainer_pb2.RunEvent) -> None:
        where = f"run {event.run_id}"
        if event.campaign_run:
            where += f" (campaign {event.campaign_id}, run {event.campaign_run})"
        if event.kind == "step" or (event.step and not event.message and not event.kind):
            self.latest = (
                f"{where}: step {event.step}/{event.total_steps}  loss {event.loss:.4f}  "
                f"lr {event.learning_rate:.1e}  {event.tokens_per_second:.0f} tok/s  "
                f"eta {event.eta_seconds:.0f}s  safety {safety_name(event.safety_level)}"
            )
            return
        what = event.kind or common_pb2.JobStatus.Name(event.status).removeprefix("JOB_STATUS_")
        detail = f"eval loss {event.eval_loss:.4f}" if event.kind == "eval" else event.message
        self.latest = f"{where}: {what}" + (f": {detail}" if detail and detail != what else "")
        self.line(self.latest)


class PlainExportProgress(_PlainLines):
    """A line for each stage of the export as it starts, and the latest every interval."""

    def __call__(self, event: export_pb2.ExportEvent) -> None:
        where = f"export {event.export_id} of run {event.run_id}"
        if event.stage_count:
            text = f"{where}: {event.stage} ({event.stage_index}/{event.stage_count})"
        else:
            text = (
                f"{where}: "
                + common_pb2.JobStatus.Name(event.status).removeprefix("JOB_STATUS_").lower()
            )
        text += f": {event.message}" if event.message else ""
        if text != self.latest:
            self.latest = text
            self.line(text)


def train_progress(console: Console, interval_seconds: float) -> TrainProgress | PlainTrainProgress:
    """A progress bar on a terminal, plain lines elsewhere."""
    if console.is_terminal:
        return TrainProgress(console)
    return PlainTrainProgress(console, interval_seconds)


def export_progress(
    console: Console, interval_seconds: float
) -> ExportProgress | PlainExportProgress:
    """A progress bar on a terminal, plain lines elsewhere."""
    if console.is_terminal:
        return ExportProgress(console)
    return PlainExportProgress(console, interval_seconds)
