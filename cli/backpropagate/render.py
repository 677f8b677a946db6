"""How the CLI shows records: tables for people, JSON with the proto's field names for scripts."""

from __future__ import annotations

from typing import Annotated

import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table
from rich.text import Text

from backpropagate.results import ExportResult, RunResult
from backpropagate_api.uploads import listed
from backpropagate_api.v1 import dataprep_pb2, trainer_pb2

JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the record as JSON (proto field names).")
]
FormatOption = Annotated[
    str,
    typer.Option(
        "--format",
        help="The rows' format: auto (detected), openai, sharegpt, alpaca, chatml, text, "
        "preference or kto.",
    ),
]

LanguagesOption = Annotated[
    str,
    typer.Option(
        "--language",
        help="Keep rows in these languages only, e.g. 'en' or 'en,fr' (the others are removed "
        "and listed).",
    ),
]

console = Console()
err_console = Console(stderr=True)


def run_rows(run: RunResult) -> list[tuple[str, str]]:
    """A run's record as (label, value) lines, as `runs show` and the web UI show it."""
    return [
        ("run", run.run_id),
        ("status", run.status),
        ("model", run.base_model),
        (
            "method",
            f"{run.method} with {run.adapter}"
            + (f", update kept at {run.adapter_scale:g}" if run.adapter_scale != 1 else ""),
        ),
        ("steps", str(run.steps) + (f" ({run.budget_reason})" if run.budget_reason else "")),
        ("final loss", f"{run.final_loss:.4f}"),
        *_eval_rows(run),
        ("samples seen", str(run.samples_seen)),
        (
            "conversations",
            f"{run.examples_trained} trained ({run.examples_truncated} truncated), "
            f"{run.examples_dropped} dropped at max_length, {run.examples_left_out} left out "
            "by length or perplexity",
        ),
        ("duration", f"{run.duration_seconds:.1f}s"),
        *([("memory plan", run.memory_plan)] if run.memory_plan else []),
        *_hardware_rows(run),
        ("adapter", run.output),
        ("attempts", str(run.attempts)),
        ("worker", run.worker or "-"),
        *([("processes", str(run.processes))] if run.processes > 1 else []),
        ("resumed from step", str(run.resumed_from_step) if run.resumed_from_step else "-"),
        ("checkpoints", ", ".join(map(str, run.checkpoint_steps)) or "-"),
        *_campaign_rows(run),
    ]


def print_rows(rows: list[tuple[str, str]]) -> None:
    table = Table(show_header=False, box=None)
    for label, value in rows:
        table.add_row(f"[bold]{label}[/]", value)
    console.print(table)


def print_run(run: RunResult) -> None:
    print_rows(run_rows(run))
    if run.timeline:
        console.print(merge_timeline(run))


def _campaign_rows(run: RunResult) -> list[tuple[str, str]]:
    if run.campaign_id:
        return [("campaign", f"run {run.campaign_run} of {run.campaign_id}")]
    if not run.merge:
        return []
    rehearsal = f", replaying {run.replay:g} of each run's rows" if run.replay else ""
    return [
        (
            "campaign",
            f"{len(run.timeline)} of {run.runs_planned} runs merged ({run.merge}{rehearsal})",
        ),
        ("runs", ", ".join(run.run_ids) or "-"),
    ]


TIMELINE_COLUMNS = ("run", "run id", "rows", "final loss", "task", "weight", "update moved")


def timeline_rows(run: RunResult) -> list[tuple[str, ...]]:
    """A campaign's runs as they were merged: what each trained on, its loss, its weight in
    the merge and how far it moved the merged update (TIMELINE_COLUMNS)."""
    return [
        (
            str(point.run),
            point.run_id,
            str(point.samples),
            f"{point.loss:.4f}",
            str(point.task),
            f"{point.merge_weight:.3f}",
            f"{point.change_norm:.3g}",
        )
        for point in run.timeline
    ]


def merge_timeline(run: RunResult) -> Table:
    table = Table(title=f"merge timeline ({run.merge})")
    for column in TIMELINE_COLUMNS:
        table.add_column(column, justify="left" if column == "run id" else "right")
    for row in timeline_rows(run):
        table.add_row(*row)
    return table


def _eval_rows(run: RunResult) -> list[tuple[str, str]]:
    if run.method != "sft":
        return [
            ("reward margin", f"{run.reward_margin:.4f} (chosen minus rejected, last steps)"),
            ("reward accuracy", f"{run.reward_accuracy:.0%}"),
        ]
    if not run.evals:
        return []
    base_step, base_loss = run.evals[0]
    return [
        (
            "eval loss",
            f"{run.best_eval_loss:.4f} at step {run.best_step} (saved)"
            + (", stopped early" if run.stopped_early else ""),
        ),
        ("base eval loss", f"{base_loss:.4f}" if base_step == 0 else "-"),
    ]


def _hardware_rows(run: RunResult) -> list[tuple[str, str]]:
    if not run.device:
        return []
    rows = [("device", f"{run.device} ({run.compute_dtype})")]
    if run.compute_dtype_reason:  # records written before the reason was kept have none
        rows.append((f"why {run.compute_dtype}", run.compute_dtype_reason))
    return [
        *rows,
        ("trainable", f"{run.trainable_parameters / 1e6:.2f} M parameters"),
        ("speed", f"{run.tokens_per_second:.0f} trained tokens/s"),
        ("peak memory", f"{run.peak_memory_bytes / 2**30:.2f} GiB"),
    ]


def export_rows(result: ExportResult) -> list[tuple[str, str]]:
    """An export's record and verification report as (label, value) lines."""
    rows = [
        ("export", result.export_id),
        ("format", result.format),
        *(("file", str(path)) for path in result.files[:3]),
        ("quantization", result.quantization),
        ("size", f"{result.size_bytes / 2**20:.1f} MiB"),
        ("merge check", f"max logit difference {result.merge_error:.1e} of the largest"),
    ]
    if result.format != "hf":  # an hf export is the torch model itself: nothing to compare
        rows += [
            ("sha256", result.sha256),
            ("agreement with torch", f"{result.top1_agreement:.1%} top-1, KL {result.mean_kl:.4f}"),
            (
                "perplexity",
                f"{result.perplexity_gguf:.2f} (torch {result.perplexity_reference:.2f})",
            ),
        ]
    rows.append(("duration", f"{result.duration_seconds:.1f}s"))
    return rows


def print_export(result: ExportResult) -> None:
    print_rows(export_rows(result))
    if result.verification_warning:
        err_console.print(f"[bold yellow]warning[/]: {result.verification_warning}")


def record_dict(message: Message, every_field: bool = False) -> dict[str, object]:
    """A record as scripts read it: the proto's field names; `every_field`: zeros too (a
    histogram's empty bin still has its row count)."""
    return MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=every_field,
    )


def print_json(message: Message) -> None:
    """A record as scripts read it: JSON with the proto's field names."""
    print_json_data(record_dict(message))


def print_json_data(data: object) -> None:
    console.print_json(data=data)


def dataset_rows(info: dataprep_pb2.DatasetInfo) -> list[tuple[str, str]]:
    """An uploaded dataset's record as (label, value) lines: what it holds, what was left out."""
    return [
        ("dataset", info.dataset_id + (" (prepared before)" if info.reused else "")),
        ("file", f"{info.filename} ({info.size_bytes:,} bytes)"),
        ("format", info.format),
        (
            "examples",
            f"{info.num_examples:,} of {info.rows_read:,} rows ({info.num_turns:,} turns)",
        ),
        ("left out", f"{info.rows_rejected:,} invalid, {info.rows_removed:,} duplicates"),
    ]


def left_out_lines(info: dataprep_pb2.DatasetInfo) -> list[str]:
    """The rows left out of a dataset and why, by line: "left out: line 3: ..." (the first
    ones of each kind, then how many more)."""
    return [
        f"{title}: {line}"
        for title, rows, count in (
            ("left out", info.rejections, info.rows_rejected),
            ("duplicates", info.removed, info.rows_removed),
        )
        for line in listed(rows, count)
    ]


def print_dataset(info: dataprep_pb2.DatasetInfo) -> None:
    """An uploaded dataset: what it holds, what was left out and why, its first example."""
    print_rows(dataset_rows(info))
    for line in left_out_lines(info):
        console.print(f"  {line}", markup=False)
    console.print("[bold]first example[/]")
    console.print_json(info.preview_json)


SPAN_STYLES = {"context": "dim", "trained": "bold green", "cut": "red strike"}
HISTOGRAM_WIDTH = 40


def token_summary(stats: trainer_pb2.TokenStats) -> str:
    return (
        f"{stats.tokens:,} in {stats.rows:,} rows, {stats.trained_tokens:,} trained; per row "
        f"min {stats.min_tokens:,}, median {stats.median_tokens:,}, p95 {stats.p95_tokens:,}, "
        f"max {stats.max_tokens:,}"
    )


def max_length_note(stats: trainer_pb2.TokenStats) -> str:
    """What max_length costs the dataset: every row fits, or the rows it cuts."""
    if not (stats.truncated or stats.dropped):
        return f"max_length {stats.max_length:,}: every row fits"
    return (
        f"max_length {stats.max_length:,}: {stats.truncated:,} rows truncated (their ends not "
        f"learnt), {stats.dropped:,} with nothing to learn"
    )


def print_token_stats(stats: trainer_pb2.TokenStats) -> None:
    """A dataset in the model's tokens: lengths, their histogram, what max_length costs, and the
    first row with what is learnt in green (read-only context dim, cut-off text struck out)."""
    console.print(f"[bold]tokens[/] ({stats.base_model}): {token_summary(stats)}")
    widest = max((part.rows for part in stats.histogram), default=0)
    for part in stats.histogram:
        bar = "#" * round(HISTOGRAM_WIDTH * part.rows / widest) if widest else ""
        over = part.low > stats.max_length
        console.print(
            f"  {part.low:>7,}-{part.high:<7,} {part.rows:>7,} {bar}",
            style="red" if over else None,
            markup=False,
        )
    if stats.truncated or stats.dropped:
        console.print(f"[yellow]{max_length_note(stats)}[/] (--max-length to keep more)")
    else:
        console.print(max_length_note(stats))
    console.print("[bold]first example, as trained[/] ([bold green]learnt[/], [dim]context[/])")
    sample = Text()
    for span in stats.sample:
        sample.append(span.text, style=SPAN_STYLES.get(span.kind))
    console.print(sample)
