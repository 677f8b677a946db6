"""Multi-run: a campaign of runs on new slices of the Data page's dataset, each merged into the
campaign's adapter (SLAO by default); its progress run by run and its merge timeline as each
merge lands. The campaign is one job on the stack, like a run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from backpropagate.ui.components import loss_chart
from backpropagate.ui.context import UiContext
from backpropagate.ui.data_page import PickedDataset, required
from backpropagate.ui.follow import RunView, followed
from backpropagate.ui.handlers import shown_errors
from backpropagate_api.training import DEFAULT_REPLAY
from backpropagate_api.v1 import trainer_pb2

MERGES = ("slao", "last-merge", "no-qr", "average", "sequential")


def build(context: UiContext, model: gr.Textbox, dataset: gr.State) -> None:
    gr.Markdown(
        "Train again and again on new slices of the Data page's dataset without forgetting: "
        "each run goes on from the last, and its adapter is merged into the campaign's."
    )
    with gr.Row():
        runs = gr.Number(3, precision=0, label="runs", elem_id="multi-runs")
        steps = gr.Number(100, precision=0, label="steps per run", elem_id="multi-steps")
        samples = gr.Number(
            0, precision=0, label="rows per run (0: an equal share)", elem_id="multi-samples"
        )
        merge = gr.Dropdown(list(MERGES), value="slao", label="merge")
    with gr.Row():
        with_replacement = gr.Checkbox(label="runs may share rows (draw from the whole pool)")
        replay = gr.Number(
            DEFAULT_REPLAY,
            label="replay: earlier runs' rows, a share of each run's (0: none)",
            minimum=0,
            maximum=1,
            elem_id="multi-replay",
        )
        continue_from = gr.Textbox(label="continue a finished campaign (its id)")
        batch_size = gr.Number(0, precision=0, label="batch size (0: the trainer's)")
        max_length = gr.Number(
            0, precision=0, label="max length (0: the trainer's)", elem_id="multi-max-length"
        )
    with gr.Row():
        start_button = gr.Button("Start campaign", variant="primary", elem_id="multi-start")
        cancel = gr.Button("Cancel", variant="stop", elem_id="multi-cancel")
    campaign_box = gr.Textbox(label="campaign", elem_id="multi-campaign-id")
    status = gr.Markdown(elem_id="multi-status")
    chart = loss_chart("loss by run", 280, "multi-chart")
    timeline = gr.Markdown(elem_id="multi-timeline")
    record = gr.Markdown(elem_id="multi-record")

    def shown(view: RunView) -> dict[Any, Any]:
        return {
            campaign_box: view.run_id,
            status: view.status,
            chart: view.chart,
            timeline: view.timeline,
            record: view.record,
        }

    @shown_errors
    def start(
        model_name: str,
        picked: PickedDataset | None,
        run_count: float,
        run_steps: float,
        run_samples: float,
        merge_mode: str,
        share_rows: bool,
        rehearsal: float | None,
        campaign: str,
        batch: float,
        length: float,
    ) -> Iterator[dict[Any, Any]]:
        chosen = required(picked)
        queued = context.trainer(model_name).multi_run(
            chosen.path,
            runs=int(run_count or 0),
            steps_per_run=int(run_steps or 0),
            samples_per_run=int(run_samples or 0),
            merge=merge_mode,
            with_replacement=share_rows,
            replay=None if rehearsal is None else float(rehearsal),  # cleared: the default
            continue_from=campaign.strip(),
            batch_size=int(batch or 0),
            max_length=int(length or 0),
            data_format=chosen.data_format,
            wait=False,
        )
        # The chart cleared and drawn afresh with one curve a run (views.loss_frame).
        yield {campaign_box: queued.run_id, chart: None, timeline: "", record: ""}
        curves = [f"run {run} train" for run in range(1, queued.runs_planned + 1)]
        for view in followed(context.connection, queued.run_id, curves):
            yield shown(view)

    @shown_errors
    def cancel_campaign(campaign_id: str) -> str:
        connection = context.connection
        request = trainer_pb2.CancelRunRequest(run_id=campaign_id)
        connection.call("trainer", connection.trainer.CancelRun, request)
        return "cancel requested: the campaign stops before its next step"

    inputs = [
        model,
        dataset,
        runs,
        steps,
        samples,
        merge,
        with_replacement,
        replay,
        continue_from,
        batch_size,
        max_length,
    ]
    start_button.click(start, inputs, [campaign_box, status, chart, timeline, record])
    cancel.click(cancel_campaign, campaign_box, status)
