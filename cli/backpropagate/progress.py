"""Rich progress bars for training and export events."""

from __future__ import annotations

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


def safety_label(level: int) -> str:
    if level == common_pb2.SAFETY_LEVEL_UNSPECIFIED:
        return "[dim]safety ?[/]"
    name = common_pb2.SafetyLevel.Name(level).removeprefix("SAFETY_LEVEL_").lower()  # type: ignore[arg-type]
    return f"[{SAFETY_STYLE.get(level, 'white')}]{name}[/]"


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
