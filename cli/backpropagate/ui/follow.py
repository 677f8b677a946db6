"""A run as a page shows it while it goes: its status line, its loss chart (and eval loss), a
campaign's merge timeline, and its record once it ends. Train, Runs and Multi-run all follow
runs through this, from the run's first event: a page opened later, or again after the browser
was closed, catches up with what happened before it looked."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pandas as pd

from backpropagate.connection import Connection
from backpropagate.render import TIMELINE_COLUMNS, run_rows, timeline_rows
from backpropagate.results import RunResult
from backpropagate.ui.views import (
    RUN_SERIES,
    error_markdown,
    event_status,
    loss_frame,
    loss_point,
    record_loss_frame,
    rows_markdown,
    table_markdown,
)
from backpropagate.workflows import run_events
from backpropagate_api.grpc_errors import detail_to_error
from backpropagate_api.statuses import status_name
from backpropagate_api.v1 import trainer_pb2

# A page is sent a new picture at most this often while events stream in (a long run's chart
# is not redrawn for every step), and always at the end.
REDRAW_SECONDS = 0.5


@dataclass
class RunView:
    run_id: str
    status: str = "queued"
    chart: pd.DataFrame = field(default_factory=lambda: loss_frame([]))  # views.loss_frame
    timeline: str = ""  # a campaign's merges so far, Markdown
    record: str = ""  # the record, Markdown, once the run ended
    ended: bool = False


def get_record(connection: Connection, run_id: str) -> trainer_pb2.RunRecord:
    request = trainer_pb2.GetRunRequest(run_id=run_id)
    return connection.call("trainer", connection.trainer.GetRun, request)


def record_markdown(record: trainer_pb2.RunRecord) -> str:
    """A run's record as the Runs page and the end of a followed run show it."""
    text = rows_markdown(run_rows(RunResult.from_proto(record)))
    if record.error.code:
        text = error_markdown(detail_to_error(record.error)) + "\n\n" + text
    return text


def timeline_markdown(run: RunResult) -> str:
    if not run.timeline:
        return ""
    title = f"**merge timeline** ({run.merge})" if run.merge else "**merge timeline**"
    return f"{title}\n\n{table_markdown(TIMELINE_COLUMNS, timeline_rows(run))}"


def ended_view(record: trainer_pb2.RunRecord) -> RunView:
    """A run that ended, from its record alone."""
    run = RunResult.from_proto(record)
    return RunView(
        record.run_id,
        f"{status_name(record.status)}: {run.steps} steps, final loss {run.final_loss:.4f}",
        record_loss_frame(record),
        timeline_markdown(run),
        record_markdown(record),
        ended=True,
    )


def followed(
    connection: Connection, run_id: str, series: Sequence[str] = RUN_SERIES
) -> Iterator[RunView]:
    """The run's view after its events so far, then as they come, then at its end; its chart
    holds `series` (views.loss_frame)."""
    view = RunView(run_id, chart=loss_frame([], series))
    points: list[tuple[int, float, str]] = []
    merges: list[trainer_pb2.MergePoint] = []
    shown = 0.0
    for event in run_events(connection, run_id):
        point = loss_point(event)
        if point is not None:
            points.append(point)
        if event.HasField("merge"):
            merges.append(event.merge)
            campaign = trainer_pb2.RunRecord(run_id=run_id)
            campaign.campaign.timeline.extend(merges)
            view.timeline = timeline_markdown(RunResult.from_proto(campaign))
        view.status = event_status(event)
        if time.monotonic() - shown >= REDRAW_SECONDS:
            view.chart = loss_frame(points, series)
            shown = time.monotonic()
            yield view
    final = ended_view(get_record(connection, run_id))
    if points:  # the events' curve: eval losses and a campaign's runs as their own series
        final.chart = loss_frame(points, series)
    yield final
