"""Train: every setting, prefilled with the smart default and its reason (train_form); method
and adapter among them; the memory estimate before the start; then the run, live: its loss
(and eval loss) chart, tokens/s, ETA and safety level. Cancel stops it before its next step.

The run is a job on the stack: closing the browser stops only the watching. "Watch" takes any
run up again, from its first event."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import gradio as gr

from backpropagate.run_history import resolve_run_id
from backpropagate.sdk import Trainer
from backpropagate.ui.components import loss_chart
from backpropagate.ui.context import UiContext
from backpropagate.ui.data_page import PickedDataset, required
from backpropagate.ui.follow import RunView, followed
from backpropagate.ui.handlers import shown_errors
from backpropagate.ui.train_form import FormField, form_fields, train_kwargs
from backpropagate.ui.views import estimate_markdown
from backpropagate_api.statuses import status_name
from backpropagate_api.v1 import trainer_pb2

FIELDS_PER_ROW = 2
# What estimate_memory takes of train()'s keywords.
ESTIMATE_KEYWORDS = set(inspect.signature(Trainer.estimate_memory).parameters)


def field_input(field: FormField) -> gr.components.Component:
    """The input of one setting: its kind from its default's type."""
    common: dict[str, Any] = {
        "label": field.label,
        "info": field.info,
        "value": field.default,
        "elem_id": f"train-{field.name.replace('_', '-')}",
    }
    if field.choices:
        return gr.Dropdown(list(field.choices), **common)
    if isinstance(field.default, bool):
        return gr.Checkbox(**common)
    if isinstance(field.default, int):
        return gr.Number(precision=0, **common)
    if isinstance(field.default, float):
        return gr.Number(**common)
    return gr.Textbox(**common)


def settings_inputs(form: list[FormField]) -> list[gr.components.Component]:
    """The settings, two to a row, in an accordion that says what a default means."""
    inputs: list[gr.components.Component] = []
    with gr.Accordion(
        "Settings: each starts at what the trainer would choose, and says why; one left there "
        "is the trainer's choice",
        open=True,
    ):
        for first in range(0, len(form), FIELDS_PER_ROW):
            with gr.Row():
                inputs += [field_input(field) for field in form[first : first + FIELDS_PER_ROW]]
    return inputs


def dataset_line(picked: PickedDataset | None) -> str:
    if picked is None:
        return "**dataset**: none yet: upload or pick one on the Data page"
    return f"**dataset**: {picked.path.rsplit('/', 1)[-1]} (format {picked.data_format})"


def build(context: UiContext, model: gr.Textbox, dataset: gr.State) -> None:
    form = form_fields(context.settings)
    line = gr.Markdown(dataset_line(None), elem_id="train-dataset")
    dataset.change(dataset_line, dataset, line)
    with gr.Row():
        with gr.Column(scale=1):
            inputs = settings_inputs(form)
        with gr.Column(scale=1):
            with gr.Row():
                estimate = gr.Button("Estimate memory", elem_id="train-estimate")
                start_button = gr.Button("Start", variant="primary", elem_id="train-start")
                cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
            with gr.Row():
                run_box = gr.Textbox(label="run", elem_id="train-run-id", scale=3)
                watch = gr.Button("Watch", elem_id="train-watch", scale=1)
            status = gr.Markdown(elem_id="train-status")
            chart = loss_chart("loss", 300, "train-chart")
            memory = gr.Markdown(elem_id="train-memory")
            record = gr.Markdown(elem_id="train-record")
    followed_outputs = [run_box, status, chart, record]

    def shown(view: RunView) -> dict[Any, Any]:
        return {
            run_box: view.run_id,
            status: view.status,
            chart: view.chart,
            record: view.record,
        }

    def memory_estimate(trainer: Trainer, picked: PickedDataset, given: dict[str, Any]) -> str:
        keywords = {name: value for name, value in given.items() if name in ESTIMATE_KEYWORDS}
        estimate_of = trainer.estimate_memory(
            picked.path, data_format=picked.data_format, **keywords
        )
        return estimate_markdown(estimate_of)

    @shown_errors
    def estimate_only(model_name: str, picked: PickedDataset | None, *values: Any) -> str:
        given = train_kwargs(form, values)
        return memory_estimate(context.trainer(model_name), required(picked), given)

    @shown_errors
    def start(
        model_name: str, picked: PickedDataset | None, *values: Any
    ) -> Iterator[dict[Any, Any]]:
        chosen, given = required(picked), train_kwargs(form, values)
        trainer = context.trainer(model_name)
        estimate_text = memory_estimate(trainer, chosen, given)
        # The chart cleared, so that it is drawn afresh for this run (views.loss_frame).
        yield {memory: estimate_text, status: "queueing the run", chart: None, record: ""}
        run = trainer.train(chosen.path, wait=False, **chosen.upload_options(), **given)
        for view in followed(context.connection, run.run_id):
            yield shown(view)

    @shown_errors
    def watch_run(text: str) -> Iterator[dict[Any, Any]]:
        yield {chart: None, record: ""}
        for view in followed(context.connection, resolve_run_id(context.connection, text)):
            yield shown(view)

    @shown_errors
    def cancel_run(text: str) -> str:
        connection = context.connection
        request = trainer_pb2.CancelRunRequest(run_id=resolve_run_id(connection, text))
        cancelled = connection.call("trainer", connection.trainer.CancelRun, request)
        return f"cancel requested ({status_name(cancelled.status)}): it stops before its next step"

    everything = [model, dataset, *inputs]
    estimate.click(estimate_only, everything, memory)
    started = start_button.click(start, everything, [memory, *followed_outputs])
    watch.click(watch_run, run_box, followed_outputs, cancels=[started])
    cancel.click(cancel_run, run_box, status)
