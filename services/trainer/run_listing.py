"""ListRuns a page at a time: newest first by the time in the run's id, reading only the records
a page shows (and those a status filter passes over), however many runs the store holds.

What is no readable run (a damaged run.json, a directory under runs/ whose name no run can
have) is left out and named in the answer and the log: one bad entry must not hide every run.
"""

from __future__ import annotations

import logging

from backpropagate_api.errors import (
    ArtifactInvalidError,
    NotFoundError,
    UserError,
    quoted,
)
from backpropagate_api.ids import checked_id
from backpropagate_api.layout import run_record_key
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.records import load_record
from backpropagate_services.common.store import ArtifactStore

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
RECORD_NAME = "/run.json"


def newest_first(run_ids: list[str]) -> list[str]:
    """Ids as new_id makes them (kind-YYYYmmddTHHMMSS-hex), newest first whatever their kind."""

    def created(run_id: str) -> tuple[str, str]:
        parts = run_id.split("-")
        return (parts[1] if len(parts) > 2 else "", run_id)

    return sorted(run_ids, key=created, reverse=True)


def page_size(request: trainer_pb2.ListRunsRequest) -> int:
    """The runs this answer may hold; a bad size or an unknown status is the caller's error."""
    if request.status not in common_pb2.JobStatus.values():
        raise UserError(
            f"Unknown run status {request.status}.",
            hint="Use one of the JobStatus values, or leave it unset for any.",
            fields="status",
        )
    if request.page_size < 0 or request.limit < 0:
        raise UserError(
            "page_size and limit must be 0 or more.",
            hint=f"Ask for at most {MAX_PAGE_SIZE} runs a page.",
            fields="page_size,limit",
        )
    size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    return min(size, request.limit) if request.limit else size


def stored_run_ids(store: ArtifactStore) -> tuple[list[str], list[str]]:
    """The ids of the runs with a record in the store, and the record keys under a directory
    whose name is no run id (left by hand or by another tool)."""
    run_ids: list[str] = []
    misnamed: list[str] = []
    for key in store.list("runs/"):
        if not (key.endswith(RECORD_NAME) and key.count("/") == 2):
            continue
        run_id = key.removeprefix("runs/").removesuffix(RECORD_NAME)
        try:
            run_ids.append(checked_id(run_id, "run"))
        except NotFoundError:
            misnamed.append(key)
    return run_ids, misnamed


def left_out(answer: trainer_pb2.ListRunsResponse, key: str, why: str) -> None:
    """Name `key` in the answer; `why` (which names it too) goes to the log."""
    log.warning("ListRuns leaves a record out: %s", why)
    answer.unreadable_records.append(key)


def list_runs_page(
    store: ArtifactStore, request: trainer_pb2.ListRunsRequest
) -> trainer_pb2.ListRunsResponse:
    """The page of runs after `request.page_token` (newest first), and the token of the next.

    Unreadable entries are named in `unreadable_records`: misnamed ones on the first page,
    damaged records on the page they would have been on."""
    size = page_size(request)
    stored, misnamed = stored_run_ids(store)
    run_ids = newest_first(stored)
    start = run_ids.index(request.page_token) + 1 if request.page_token in run_ids else 0
    if request.page_token and not start:
        raise UserError(
            f"Unknown page token {quoted(request.page_token)}.",
            hint="Pass the next_page_token of the previous answer, or none for the first page.",
            fields="page_token",
        )
    answer = trainer_pb2.ListRunsResponse()
    if not request.page_token:
        for key in misnamed:
            left_out(answer, key, f"{key}: its directory's name is not a run id")
    for position in range(start, len(run_ids)):
        if len(answer.runs) == size:
            answer.next_page_token = run_ids[position - 1]
            break
        key = run_record_key(run_ids[position])
        try:
            record = load_record(store, key, trainer_pb2.RunRecord, "run")
        except ArtifactInvalidError as damaged:
            left_out(answer, key, damaged.message)
            continue
        if not request.status or record.status == request.status:
            answer.runs.append(record)
    return answer
