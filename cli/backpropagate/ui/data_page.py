"""Data: upload a dataset (or pick an earlier upload or a shipped example) and see it as a run
will: its detected format, the rows kept and left out with their lines and reasons, its token
statistics in the model's tokens, and its first row as trained (trained tokens highlighted).
The dataset picked here is the one Train and Multi-run use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from backpropagate.data_cli import column_mapping, language_codes
from backpropagate.render import dataset_rows, left_out_lines, max_length_note, token_summary
from backpropagate.ui.context import DATASET_SUFFIXES, UiContext
from backpropagate.ui.handlers import shown_errors
from backpropagate.ui.views import rows_markdown, table_markdown
from backpropagate_api.errors import NotFoundError
from backpropagate_api.v1 import dataprep_pb2, trainer_pb2

FORMATS = ("auto", "openai", "sharegpt", "alpaca", "chatml", "text", "preference", "kto")
# How the first row is highlighted: what is learnt, what is only read, what max_length cuts.
SPAN_LABELS = {"trained": "trained", "context": None, "cut": "cut at max_length"}
SPAN_COLORS = {"trained": "green", "cut at max_length": "red"}


@dataclass(frozen=True)
class PickedDataset:
    """What Train and Multi-run train on: the file and the options it was inspected with."""

    path: str
    data_format: str = "auto"
    dedup: str = ""
    languages: tuple[str, ...] = ()
    columns: tuple[tuple[str, str], ...] = ()
    strict: bool = False

    def upload_options(self) -> dict[str, Any]:
        """The keywords Trainer.train and multi_run take for them."""
        return {
            "data_format": self.data_format,
            "dedup": self.dedup,
            "languages": list(self.languages),
            "columns": dict(self.columns),
            "strict": self.strict,
        }


def required(picked: PickedDataset | None) -> PickedDataset:
    """The dataset Train and Multi-run work on, once the Data page has one."""
    if picked is None:
        raise NotFoundError(
            "No dataset picked yet.", hint="Upload or pick one on the Data page first."
        )
    return picked


def pick_choices(context: UiContext) -> list[tuple[str, str]]:
    return [(f"{path.name} ({path.parent.name})", str(path)) for path in context.dataset_files()]


def offered(context: UiContext, picked: str) -> Path:
    """A picked file, if the page offered it; a value the browser made up is refused."""
    if picked not in {str(path) for path in context.dataset_files()}:
        raise NotFoundError(
            "That dataset is not one this page offers.",
            hint="Upload the file, or pick one from the list.",
        )
    return Path(picked)


def token_spans(stats: trainer_pb2.TokenStats) -> list[tuple[str, str | None]]:
    return [(span.text, SPAN_LABELS.get(span.kind)) for span in stats.sample]


def summary_markdown(info: dataprep_pb2.DatasetInfo, stats: trainer_pb2.TokenStats) -> str:
    left_out = left_out_lines(info)
    histogram = table_markdown(
        ["tokens", *(f"{part.low:,}-{part.high:,}" for part in stats.histogram)],
        [["rows", *(f"{part.rows:,}" for part in stats.histogram)]],
    )
    return "\n\n".join(
        [
            rows_markdown(dataset_rows(info)),
            "**left out, by line**\n\n" + "\n".join(f"- {line}" for line in left_out)
            if left_out
            else "every row kept",
            f"**tokens** ({stats.base_model}): {token_summary(stats)}",
            max_length_note(stats),
            histogram,
        ]
    )


def build(context: UiContext, model: gr.Textbox, dataset: gr.State) -> None:
    gr.Markdown("Upload a dataset, or pick one, and see it as training will.")
    with gr.Row():
        upload = gr.File(
            label="Upload (JSONL, CSV, TSV, Parquet or TXT, gzipped or not)",
            file_types=list(DATASET_SUFFIXES),
            elem_id="data-upload",
        )
        with gr.Column():
            picked = gr.Dropdown(
                pick_choices(context), label="or pick one", value=None, elem_id="data-pick"
            )
            refresh = gr.Button("Refresh the list", size="sm")
    with gr.Accordion("Options", open=False), gr.Row():
        data_format = gr.Dropdown(list(FORMATS), value="auto", label="format")
        dedup = gr.Dropdown(["", "exact", "near"], value="", label="remove duplicates")
        languages = gr.Textbox(label="keep languages (e.g. en,fr)")
        columns = gr.Textbox(label="rename columns (question=instruction,...)")
        strict = gr.Checkbox(label="fail on the first bad row")
        max_length = gr.Number(0, precision=0, label="max length (0: the trainer's)")
    inspect = gr.Button("Inspect", variant="primary", elem_id="data-inspect")
    summary = gr.Markdown(elem_id="data-summary")
    first_row = gr.HighlightedText(
        label="first row, as trained",
        color_map=SPAN_COLORS,
        combine_adjacent=True,
        elem_id="data-first-row",
    )

    @shown_errors
    def inspect_dataset(
        uploaded: str | None,
        picked_path: str | None,
        model_name: str,
        fmt: str,
        dedup_mode: str,
        language_text: str | None,
        column_text: str | None,
        strict_rows: bool,
        length: float | None,
    ) -> tuple[str, list[tuple[str, str | None]], PickedDataset]:
        if uploaded:
            path = Path(uploaded)
        elif picked_path:
            path = offered(context, picked_path)
        else:
            raise NotFoundError("No dataset yet.", hint="Upload a file or pick one first.")
        chosen = PickedDataset(
            str(path),
            fmt,
            dedup_mode,
            tuple(language_codes(language_text or "")),
            tuple(column_mapping(column_text or "").items()),
            strict_rows,
        )
        trainer = context.trainer(model_name)
        options = chosen.upload_options()
        info = trainer.inspect_data(
            path,
            options["data_format"],
            options["columns"],
            options["dedup"],
            options["languages"],
            options["strict"],
        )
        stats = trainer.inspect_tokens(info.dataset_id, max_length=int(length or 0))
        return summary_markdown(info, stats), token_spans(stats), chosen

    inputs = [upload, picked, model, data_format, dedup, languages, columns, strict, max_length]
    outputs = [summary, first_row, dataset]
    inspect.click(inspect_dataset, inputs, outputs)
    # The one chosen last is the one inspected: choosing one clears the other.
    upload.upload(lambda: None, None, picked).then(inspect_dataset, inputs, outputs)
    picked.select(lambda: None, None, upload).then(inspect_dataset, inputs, outputs)
    refresh.click(lambda: gr.update(choices=pick_choices(context)), None, picked)
