"""Runs: the run history with filters; one run's record, loss curve and checkpoints; two runs
compared field by field; resume a run that did not finish, or replay one (same config and
dataset, a new run). Resumed and replayed runs are queued like any (Train's "Watch" follows
them)."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr
import pandas as pd

from backpropagate.run_history import differences, list_runs, resolve_run_id
from backpropagate.ui.components import loss_chart
from backpropagate.ui.context import UiContext
from backpropagate.ui.follow import ended_view, get_record
from backpropagate.ui.handlers import shown_errors
from backpropagate.ui.views import table_markdown
from backpropagate.workflows import submit_train
from backpropagate_api.statuses import status_name
from backpropagate_api.v1 import common_pb2, trainer_pb2

STATUSES = ["", *(status_name(value) for value in common_pb2.JobStatus.values()[1:])]
HISTORY_COLUMNS = ["run", "status", "model", "steps", "final loss", "created"]


def history_frame(runs: list[trainer_pb2.RunRecord], text: str) -> pd.DataFrame:
    """The runs whose id or model contains `text`, newest first."""
    rows = [
        [
            record.run_id,
            status_name(record.status),
            record.base_model,
            record.steps,
            round(record.final_loss, 4) if record.final_loss else None,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at)),
        ]
        for record in runs
        if text.lower() in f"{record.run_id} {record.base_model}".lower()
    ]
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def checkpoints_markdown(record: trainer_pb2.RunRecord) -> str:
    if not record.checkpoints:
        return "no checkpoints kept"
    return "**checkpoints**\n\n" + table_markdown(
        ("step", "loss", "size", "written in"),
        (
            (c.step, f"{c.loss:.4f}", f"{c.size_bytes / 2**20:.1f} MiB", f"{c.seconds:.1f} s")
            for c in record.checkpoints
        ),
    )


def build(context: UiContext, tab: gr.Tab) -> None:
    with gr.Row():
        status = gr.Dropdown(STATUSES, value="", label="status (empty: any)", elem_id="runs-status")
        text = gr.Textbox(label="run id or model contains")
        limit = gr.Number(50, precision=0, label="most recent (0: all)")
        refresh = gr.Button("Refresh", elem_id="runs-refresh")
    history = gr.Dataframe(
        headers=HISTORY_COLUMNS, interactive=False, elem_id="runs-history", wrap=True
    )
    with gr.Row():
        run_box = gr.Textbox(
            label="run (click one above, or type part of its id)", scale=3, elem_id="runs-run-id"
        )
        show = gr.Button("Show", elem_id="runs-show", scale=1)
        resume = gr.Button("Resume", elem_id="runs-resume", scale=1)
        replay = gr.Button("Replay", elem_id="runs-replay", scale=1)
    message = gr.Markdown(elem_id="runs-message")
    chart = loss_chart("loss", 260, "runs-chart")
    record_box = gr.Markdown(elem_id="runs-record")
    checkpoints = gr.Markdown(elem_id="runs-checkpoints")
    with gr.Row():
        left = gr.Textbox(label="compare run", elem_id="runs-compare-left")
        right = gr.Textbox(label="with run", elem_id="runs-compare-right")
        compare = gr.Button("Compare", elem_id="runs-compare")
    comparison = gr.Markdown(elem_id="runs-comparison")

    @shown_errors
    def listed(status_filter: str, contains: str, most: float | None) -> pd.DataFrame:
        listing = list_runs(context.connection, status=status_filter, limit=int(most or 0))
        return history_frame(list(listing.runs), contains)

    @shown_errors
    def show_run(run_text: str) -> tuple[str, Any, str, str, str]:
        record = get_record(context.connection, resolve_run_id(context.connection, run_text))
        view = ended_view(record)
        details = "\n\n".join(part for part in (view.record, view.timeline) if part)
        return record.run_id, view.chart, details, checkpoints_markdown(record), view.status

    def picked(frame: pd.DataFrame, selection: gr.SelectData) -> str:
        return str(frame.iloc[selection.index[0], 0])

    @shown_errors
    def resume_run(run_text: str) -> str:
        connection = context.connection
        request = trainer_pb2.ResumeRunRequest(run_id=resolve_run_id(connection, run_text))
        resumed = connection.call("trainer", connection.trainer.ResumeRun, request)
        context.trainer().start_worker()
        step = resumed.last_checkpoint_step
        return f"resuming {resumed.run_id} from step {step}: Watch it on Train"

    @shown_errors
    def replay_run(run_text: str) -> str:
        connection = context.connection
        record = get_record(connection, resolve_run_id(connection, run_text))
        run_id = submit_train(connection, record.dataset_id, record.config)
        context.trainer().start_worker()
        return f"replaying {record.run_id} as {run_id}: Watch it on Train"

    @shown_errors
    def compare_runs(first: str, second: str) -> str:
        connection = context.connection
        a = get_record(connection, resolve_run_id(connection, first))
        b = get_record(connection, resolve_run_id(connection, second))
        rows = differences(a, b)
        if not rows:
            return "the two runs have the same config and metrics"
        return table_markdown(("field", a.run_id, b.run_id), rows)

    filters = [status, text, limit]
    refresh.click(listed, filters, history)
    tab.select(listed, filters, history)
    status.change(listed, filters, history)
    text.submit(listed, filters, history)
    limit.submit(listed, filters, history)
    history.select(picked, history, run_box).then(
        show_run, run_box, [run_box, chart, record_box, checkpoints, message]
    )
    show.click(show_run, run_box, [run_box, chart, record_box, checkpoints, message])
    resume.click(resume_run, run_box, message)
    replay.click(replay_run, run_box, message)
    compare.click(compare_runs, [left, right], comparison)
