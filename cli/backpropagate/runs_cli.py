"""`backprop runs ...`: the run history (list, show, diff, export), following a run, resuming,
replaying and cancelling it; plus the flat aliases the product's documentation uses
(`list-runs`, `show-run`, `diff-runs`, `resume`, `replay`, `export-runs`).

A run can be named by any unique part of its id (`show-run 392372`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from backpropagate.connection import Connection
from backpropagate.render import JsonOption, console, err_console, print_json, print_run
from backpropagate.results import RunResult, status_name
from backpropagate.run_history import (
    as_csv,
    as_jsonl,
    differences,
    list_runs,
    resolve_run_id,
)
from backpropagate.sdk import Trainer
from backpropagate.workflows import download_artifact
from backpropagate_api.errors import UserError
from backpropagate_api.layout import loss_curve_key
from backpropagate_api.v1 import trainer_pb2

runs_app = typer.Typer(
    help="The run history; follow, resume, replay and cancel training runs.", no_args_is_help=True
)

RunArgument = Annotated[str, typer.Argument(help="Run id, or any unique part of it.")]


@runs_app.command("list")
def runs_list(
    limit: Annotated[int, typer.Option(help="Most recent N (0: all).")] = 20,
    status: Annotated[
        str, typer.Option(help="Only runs with this status (queued, running, failed, ...).")
    ] = "",
    as_json: JsonOption = False,
) -> None:
    """List training runs, newest first."""
    listing = list_runs(Connection.for_reading(), status=status, limit=limit)
    if as_json:
        print_json(listing)
        return
    for key in listing.unreadable_records:
        err_console.print(
            f"[bold yellow]warning[/]: left out {escape(key)}: not a readable run record"
        )
    table = Table("run", "status", "model", "steps", "final loss", "created")
    for record in listing.runs:
        table.add_row(
            record.run_id,
            status_name(record.status),
            record.base_model,
            str(record.steps),
            f"{record.final_loss:.4f}" if record.final_loss else "-",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at)),
        )
    console.print(table)


def get_run(connection: Connection, text: str) -> trainer_pb2.RunRecord:
    request = trainer_pb2.GetRunRequest(run_id=resolve_run_id(connection, text))
    return connection.call("trainer", connection.trainer.GetRun, request)


@runs_app.command("show")
def runs_show(
    run_id: RunArgument,
    plot: Annotated[
        Path | None, typer.Option(help="Also download the run's loss curve to this PNG file.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show one run's record."""
    connection = Connection.for_reading()
    record = get_run(connection, run_id)
    if as_json:
        print_json(record)
        return
    print_run(RunResult.from_proto(record))
    if record.HasField("error") and record.error.code:
        console.print(f"[red]{record.error.code}[/]: {record.error.message}")
    if plot is not None:
        download_artifact(connection, loss_curve_key(record.run_id), plot)
        console.print(f"loss curve: {plot}")


@runs_app.command("diff")
def runs_diff(first: RunArgument, second: RunArgument, as_json: JsonOption = False) -> None:
    """Two runs side by side: every config field and metric that differs."""
    connection = Connection.for_reading()
    left, right = get_run(connection, first), get_run(connection, second)
    rows = differences(left, right)
    if as_json:
        console.print_json(
            data={
                "runs": [left.run_id, right.run_id],
                "differences": {n: [a, b] for n, a, b in rows},
            }
        )
        return
    table = Table("field", left.run_id, right.run_id)
    for name, a, b in rows:
        table.add_row(name, str(a), str(b))
    console.print(table if rows else "the two runs have the same config and metrics")


@runs_app.command("export")
def runs_export(
    export_format: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    output: Annotated[
        Path | None, typer.Option(help="Write to this file instead of stdout.")
    ] = None,
    status: Annotated[str, typer.Option(help="Only runs with this status.")] = "",
) -> None:
    """Every run record, newest first: JSONL (proto field names) or CSV (one row a run)."""
    render = {"jsonl": as_jsonl, "csv": as_csv}.get(export_format)
    if render is None:
        raise UserError(
            f"Unknown export format {export_format!r}.", hint="Use --format jsonl or --format csv."
        )
    text = render(list_runs(Connection.for_reading(), status=status).runs)
    if output is None:
        print(text, end="")  # raw: rich would wrap long lines
    else:
        output.write_text(text)
        console.print(f"wrote {output}")


@runs_app.command("watch")
def runs_watch(run_id: RunArgument) -> None:
    """Follow a run to its end with the progress bar (its history first)."""
    trainer = Trainer()
    print_run(trainer.watch(resolve_run_id(trainer.reader, run_id)))


@runs_app.command("resume")
def runs_resume(run_id: RunArgument) -> None:
    """Continue a run that did not finish from its last checkpoint, and follow it."""
    trainer = Trainer()
    print_run(trainer.resume(resolve_run_id(trainer.reader, run_id)))


@runs_app.command("replay")
def runs_replay(run_id: RunArgument) -> None:
    """Train again with the same config and dataset (a new run)."""
    trainer = Trainer()
    print_run(trainer.replay(resolve_run_id(trainer.reader, run_id)))


@runs_app.command("save")
def runs_save(
    run_id: RunArgument,
    directory: Annotated[Path, typer.Argument(help="A new directory to write it into.")],
    merged: Annotated[
        bool, typer.Option(help="The merged model (safetensors) instead of the adapter.")
    ] = False,
) -> None:
    """Write a run's adapter (or the merged model) to a local directory, loadable with peft."""
    trainer = Trainer()
    saved = trainer.save(directory, run_id=resolve_run_id(trainer.reader, run_id), merged=merged)
    console.print(f"saved: {saved}")


@runs_app.command("cancel")
def runs_cancel(run_id: RunArgument) -> None:
    """Cancel a queued or running run; a running one stops before its next step."""
    connection = Connection.open(workers=False)
    request = trainer_pb2.CancelRunRequest(run_id=resolve_run_id(connection, run_id))
    record = connection.call("trainer", connection.trainer.CancelRun, request)
    console.print(f"{record.run_id}: cancel requested ({status_name(record.status)})")


# The flat names of the product's documentation, as hidden aliases of the commands above.
ALIASES: dict[str, Callable[..., Any]] = {
    "list-runs": runs_list,
    "show-run": runs_show,
    "diff-runs": runs_diff,
    "export-runs": runs_export,
    "resume": runs_resume,
    "replay": runs_replay,
}


def add_run_aliases(app: typer.Typer) -> None:
    for name, command in ALIASES.items():
        app.command(name, hidden=True)(command)
