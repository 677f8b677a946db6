"""The run history as a user reads it: runs named by part of their id, two runs side by side,
every run as JSONL or CSV rows. Plain functions over run records; the CLI prints them."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable

from google.protobuf.json_format import MessageToDict

from backpropagate.connection import Connection
from backpropagate.results import status_name
from backpropagate_api.errors import NotFoundError, UserError
from backpropagate_api.v1 import common_pb2, trainer_pb2

# What `diff` and the CSV export show of a run, beside its config.
METRICS = (
    "status",
    "base_model",
    "dataset_id",
    "final_loss",
    "samples_seen",
    "duration_seconds",
    "attempts",
    "last_checkpoint_step",
    "oom_recoveries",
    "examples_trained",
    "examples_truncated",
    "examples_dropped",
)
CSV_COLUMNS = ("run_id", "created_at", *METRICS)


def list_runs(
    connection: Connection, *, status: str = "", limit: int = 0
) -> trainer_pb2.ListRunsResponse:
    """Newest first, `limit` of them (0: all), a page at a time, as one answer (with every
    page's unreadable records); `status` is a status name as `runs list` shows it ("failed")."""
    request = trainer_pb2.ListRunsRequest(status=parse_status(status))
    listing = trainer_pb2.ListRunsResponse()
    while True:
        request.limit = limit - len(listing.runs) if limit else 0
        page = connection.call("trainer", connection.trainer.ListRuns, request)
        listing.runs.extend(page.runs)
        listing.unreadable_records.extend(page.unreadable_records)
        if not page.next_page_token or (limit and len(listing.runs) >= limit):
            return listing
        request.page_token = page.next_page_token


def parse_status(status: str) -> common_pb2.JobStatus.ValueType:
    """A status name ("running", "FAILED") as the proto enum; "" is any."""
    if not status:
        return common_pb2.JOB_STATUS_UNSPECIFIED
    names = [status_name(value) for value in common_pb2.JobStatus.values()][1:]
    if status.lower() not in names:
        raise UserError(
            f"Unknown run status {status!r}.",
            hint=f"Use one of: {', '.join(names)}.",
            status=status,
        )
    return common_pb2.JobStatus.Value(f"JOB_STATUS_{status.upper()}")


def resolve_run_id(connection: Connection, text: str) -> str:
    """The run `text` names: its id, or a part of exactly one run's id."""
    matches = [record.run_id for record in list_runs(connection).runs if text in record.run_id]
    if text in matches:
        return text
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NotFoundError(
            f"No run id contains {text!r}.",
            hint="List the runs with `backprop runs list`.",
            run_id=text,
        )
    raise UserError(
        f"{text!r} is part of {len(matches)} run ids: {', '.join(matches[:5])}.",
        hint="Give more of the id.",
        run_id=text,
    )


def flat_fields(record: trainer_pb2.RunRecord) -> dict[str, object]:
    """The record's metrics and its config (as `config.<field>`), values as they print."""
    as_json = MessageToDict(
        record, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    fields: dict[str, object] = {"run_id": record.run_id, "created_at": record.created_at}
    fields.update({name: as_json.get(name) for name in METRICS})
    fields["status"] = status_name(record.status)
    config = as_json.get("config") or {}
    fields.update({f"config.{name}": value for name, value in sorted(config.items())})
    return fields


def differences(
    left: trainer_pb2.RunRecord, right: trainer_pb2.RunRecord
) -> list[tuple[str, object, object]]:
    """(field, left value, right value) for every config field and metric that differs."""
    a, b = flat_fields(left), flat_fields(right)
    names = [name for name in [*a, *(n for n in b if n not in a)] if name not in ("run_id",)]
    return [(name, a.get(name), b.get(name)) for name in names if a.get(name) != b.get(name)]


def as_jsonl(records: Iterable[trainer_pb2.RunRecord]) -> str:
    return "".join(
        json.dumps(MessageToDict(record, preserving_proto_field_name=True)) + "\n"
        for record in records
    )


def as_csv(records: Iterable[trainer_pb2.RunRecord]) -> str:
    rows = [flat_fields(record) for record in records]
    config_columns = sorted({name for row in rows for name in row if name.startswith("config.")})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*CSV_COLUMNS, *config_columns], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
