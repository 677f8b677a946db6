"""How the pages show records: Markdown, tables and chart data built from the same rows the CLI
prints (backpropagate.render), plus what only a page needs (a live status line, a loss curve).
Plain functions of records, no web framework: tested without a browser."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pandas as pd

from backpropagate.estimate_cli import estimate_parts, size
from backpropagate.progress import safety_name
from backpropagate.results import MemoryEstimateResult
from backpropagate_api.errors import BackpropagateError
from backpropagate_api.v1 import export_pb2, trainer_pb2

# Typed even when empty: the chart takes its axes' kinds from the first frame it is sent.
LOSS_TYPES = {"step": "float64", "loss": "float64", "series": "str"}
# A run's curves: its training loss and, with an eval set, its eval loss.
RUN_SERIES = ("train", "eval")


def _cell(value: object) -> str:
    """A value inside a Markdown table cell: pipes and newlines would break the table."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def rows_markdown(rows: Iterable[tuple[str, str]]) -> str:
    """(label, value) lines as a Markdown list: **label**: value."""
    return "\n".join(f"- **{_cell(label)}**: {_cell(value)}" for label, value in rows)


def table_markdown(columns: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    header = list(columns)
    lines = [
        "| " + " | ".join(map(_cell, header)) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def error_markdown(error: BackpropagateError) -> str:
    return f"**error {error.code}**: {_cell(error.message)}\n\nhint: {_cell(error.hint)}"


def estimate_markdown(estimate: MemoryEstimateResult) -> str:
    """The predicted peak memory, part by part, and whether it fits what is free now."""
    rows = [(label, size(value)) for label, value in estimate_parts(estimate)]
    rows += [
        ("predicted peak", f"**{size(estimate.total_bytes)}** on {estimate.device}"),
        ("available now", size(estimate.available_bytes)),
        (
            "fits",
            "yes"
            if estimate.fits
            else "**no**: lower the batch size or max length, or raise gradient accumulation",
        ),
    ]
    if estimate.plan:
        rows.append(("fitted to the GPU", estimate.plan))
    return rows_markdown(rows)


def event_status(event: trainer_pb2.RunEvent) -> str:
    """A run's event as one status line: step, loss, tokens/s, ETA and the safety level."""
    where = f"run {event.campaign_run} · " if event.campaign_run else ""
    if event.kind == "eval":
        return f"{where}step {event.step}: eval loss {event.eval_loss:.4f}"
    if event.step and not event.message:
        return (
            f"{where}step {event.step}/{event.total_steps} · loss {event.loss:.4f} · "
            f"{event.tokens_per_second:.0f} tokens/s · ETA {event.eta_seconds:.0f} s · "
            f"safety: {safety_name(event.safety_level)}"
        )
    return f"{where}{event.message or event.kind or 'queued'}"


def loss_point(event: trainer_pb2.RunEvent) -> tuple[int, float, str] | None:
    """The event's point on the loss chart ((step, loss, series)), if it has one: training
    loss on steps, eval loss on evaluations; a campaign's runs are series of their own."""
    prefix = f"run {event.campaign_run} " if event.campaign_run else ""
    if event.kind == "eval":
        return event.step, event.eval_loss, f"{prefix}eval"
    if event.kind == "step" or (event.step and event.loss and not event.kind):
        return event.step, event.loss, f"{prefix}train"
    return None


def loss_frame(
    points: Iterable[tuple[int, float, str]], series: Sequence[str] = RUN_SERIES
) -> pd.DataFrame:
    """Chart data: the points, and an empty row (no step, no loss: not drawn) for each of
    `series` that has none yet. Gradio's LinePlot fixes its colours when it first draws, from
    the series its data holds then (6.31): a series that appeared later would be drawn in no
    colour at all, so every series the chart will show is in its data from the start."""
    rows: list[tuple[float, float, str]] = list(points)
    present = {name for _, _, name in rows}
    rows += [(math.nan, math.nan, name) for name in series if name not in present]
    return pd.DataFrame(rows, columns=list(LOSS_TYPES)).astype(LOSS_TYPES)


def record_loss_frame(record: trainer_pb2.RunRecord) -> pd.DataFrame:
    """A finished run's loss curve from its record: training loss per step, eval losses."""
    points = [(step, loss, "train") for step, loss in enumerate(record.loss_history, start=1)]
    points += [(point.step, point.loss, "eval") for point in record.evals]
    return loss_frame(points)


def export_progress(event: export_pb2.ExportEvent) -> str:
    if event.stage_count:
        return f"stage {event.stage_index}/{event.stage_count}: {event.stage}: {event.message}"
    return event.message or "queued"
