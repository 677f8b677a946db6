"""The client side of each job: upload, submit, follow the events, fetch the result.

Shared by the SDK and the CLI. Failures come back as the server's BackpropagateError subclass,
whether the call itself failed or the job failed later on a worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from backpropagate.connection import Connection
from backpropagate.dataset_sources import missing_file
from backpropagate.results import ExportResult, RunResult
from backpropagate_api.errors import (
    ExportVerificationError,
    JobCancelledError,
    NotFoundError,
    RunInterruptedError,
)
from backpropagate_api.grpc_errors import detail_to_error
from backpropagate_api.local_names import path_inside
from backpropagate_api.statuses import TERMINAL_STATUSES
from backpropagate_api.tracing import recording, span
from backpropagate_api.uploads import prepared_dataset_id, sha256_file
from backpropagate_api.v1 import common_pb2, dataprep_pb2, export_pb2, trainer_pb2

UPLOAD_CHUNK_BYTES = 1024 * 1024

RunEventHandler = Callable[[trainer_pb2.RunEvent], None]
ExportEventHandler = Callable[[export_pb2.ExportEvent], None]


def _file_chunks(path: Path) -> Iterator[bytes]:
    """A file's bytes in upload-sized pieces, read as they are sent."""
    with path.open("rb") as handle:
        yield from iter(lambda: handle.read(UPLOAD_CHUNK_BYTES), b"")


def _upload_requests(
    path: Path, header: dataprep_pb2.UploadDatasetHeader
) -> Iterator[dataprep_pb2.UploadDatasetRequest]:
    yield dataprep_pb2.UploadDatasetRequest(header=header)
    for chunk in _file_chunks(path):
        yield dataprep_pb2.UploadDatasetRequest(chunk=chunk)


def _adapter_requests(
    directory: Path, base_model: str
) -> Iterator[trainer_pb2.ImportAdapterRequest]:
    header = trainer_pb2.ImportAdapterHeader(base_model=base_model, source=directory.name)
    yield trainer_pb2.ImportAdapterRequest(header=header)
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        for chunk in _file_chunks(path):
            file_chunk = trainer_pb2.AdapterFileChunk(path=relative, data=chunk)
            yield trainer_pb2.ImportAdapterRequest(chunk=file_chunk)


def import_adapter(connection: Connection, directory: Path, base_model: str = "") -> RunResult:
    """A local peft adapter directory as a finished run (to export, chat with, push)."""
    record = connection.call(
        "trainer", connection.trainer.ImportAdapter, _adapter_requests(directory, base_model)
    )
    return RunResult.from_proto(record)


def require_dataset_file(path: Path) -> None:
    """NotFoundError unless `path` is a file; callers may check before connecting at all."""
    if not path.is_file():
        raise missing_file(path)


def upload_dataset(
    connection: Connection,
    path: Path,
    format_hint: str = "auto",
    strict: bool = False,
    columns: Mapping[str, str] | None = None,
    dedup: str = "",
    near_duplicate_threshold: float = 0.0,
    languages: Sequence[str] = (),
) -> dataprep_pb2.DatasetInfo:
    """Upload and validate a dataset file (JSON Lines, CSV, TSV or Parquet, by its name). Bad
    rows are left out (up to 10% of the rows), counted in the answer's `rows_rejected` and the
    first 100 listed in `rejections`; `strict`: the first bad row fails the upload. `columns`
    renames a table's columns to the fields of a format ({"question": "instruction", "answer":
    "output"}). `dedup`: "exact" or "near" removes repeated rows (`rows_removed`, the first 100
    in `removed`), as does `languages` ("en", ...) for rows detected in another language. A
    file prepared before with the same options is not sent again: its record comes back with
    `reused` set."""
    require_dataset_file(path)
    stub = connection.dataprep
    header = dataprep_pb2.UploadDatasetHeader(
        filename=path.name,
        format=format_hint,
        strict=strict,
        columns=columns or {},
        dedup=dedup,
        near_duplicate_threshold=near_duplicate_threshold,
        languages=languages,
    )
    # Prepared before (the same bytes, the same options): its record, without sending the file.
    request = dataprep_pb2.InspectDatasetRequest(
        dataset_id=prepared_dataset_id(sha256_file(path), header)
    )
    try:
        prepared = connection.call("dataprep", stub.InspectDataset, request)
    except NotFoundError:
        return connection.call("dataprep", stub.UploadDataset, _upload_requests(path, header))
    prepared.reused = True
    return prepared


def _raise_if_failed(status: int, error: common_pb2.ErrorDetail, what: str) -> None:
    if status == common_pb2.JOB_STATUS_FAILED:
        raise detail_to_error(error)
    if status == common_pb2.JOB_STATUS_CANCELLED:
        raise JobCancelledError(f"{what} was cancelled.")
    if status == common_pb2.JOB_STATUS_INTERRUPTED:
        raise RunInterruptedError(f"{what} was interrupted after a checkpoint.")


def submit_train(connection: Connection, dataset_id: str, config: trainer_pb2.TrainConfig) -> str:
    """Queue a train job; returns its run id."""
    request = trainer_pb2.SubmitTrainRequest(dataset_id=dataset_id, config=config)
    return connection.call("trainer", connection.trainer.SubmitTrain, request).run_id


def submit_multi_run(
    connection: Connection,
    dataset_ids: list[str],
    config: trainer_pb2.TrainConfig,
    multi_run: trainer_pb2.MultiRunConfig,
) -> str:
    """Queue a campaign; returns its id (a run id)."""
    request = trainer_pb2.SubmitMultiRunRequest(
        dataset_ids=dataset_ids, config=config, multi_run=multi_run
    )
    return connection.call("trainer", connection.trainer.SubmitMultiRun, request).run_id


def estimate_memory(
    connection: Connection, config: trainer_pb2.TrainConfig, dataset_id: str = ""
) -> trainer_pb2.MemoryEstimate:
    """The trainer's prediction of a run's peak memory; no weights are loaded. `dataset_id`:
    an uploaded dataset whose longest rows decide the activations ("": max_length rows)."""
    request = trainer_pb2.EstimateMemoryRequest(config=config, dataset_id=dataset_id)
    return connection.call("trainer", connection.trainer.EstimateMemory, request)


def resume_run(
    connection: Connection, run_id: str, on_event: RunEventHandler | None = None
) -> RunResult:
    """Continue an unfinished run from its last checkpoint, and follow it to its end. A
    campaign's run resumes its campaign, which is followed instead."""
    request = trainer_pb2.ResumeRunRequest(run_id=run_id)
    resumed = connection.call("trainer", connection.trainer.ResumeRun, request)
    return follow_run(connection, resumed.run_id, on_event)


E = TypeVar("E", trainer_pb2.RunEvent, export_pb2.ExportEvent)
R = TypeVar("R", trainer_pb2.RunRecord, export_pb2.ExportResult)


def job_events(
    connection: Connection,
    service: str,
    watch: Callable[[Any], Iterator[E]],
    request_after: Callable[[str], Any],
    fetch_record: Callable[[], R],
) -> Iterator[E]:
    """Every event of a job once, in order, until its record is terminal: a watch the server
    ended early (idle for its watch timeout, or restarted) is taken up after the last event
    seen. A caller that stops iterating (the web UI's page closed) cancels the watch."""
    after = ""
    while True:
        for event in connection.stream(service, watch, request_after(after)):
            after = event.event_id or after
            yield event
        if fetch_record().status in TERMINAL_STATUSES:
            return


def followed_to_end(
    connection: Connection,
    service: str,
    watch: Callable[[Any], Iterator[E]],
    request_after: Callable[[str], Any],
    fetch_record: Callable[[], R],
    on_event: Callable[[E], None] | None,
) -> R:
    """Pass every event of a job to `on_event` once, in order, and return its terminal
    record."""
    for event in job_events(connection, service, watch, request_after, fetch_record):
        if on_event is not None:
            on_event(event)
    return fetch_record()


def run_events(connection: Connection, run_id: str) -> Iterator[trainer_pb2.RunEvent]:
    """A run's events from its first, as it goes, until it ends (a campaign's: its runs' and
    its merges')."""
    stub = connection.trainer
    return job_events(
        connection,
        "trainer",
        stub.WatchRun,
        lambda after: trainer_pb2.WatchRunRequest(run_id=run_id, after_event_id=after),
        lambda: connection.call("trainer", stub.GetRun, trainer_pb2.GetRunRequest(run_id=run_id)),
    )


def follow_run(
    connection: Connection, run_id: str, on_event: RunEventHandler | None = None
) -> RunResult:
    for event in run_events(connection, run_id):
        if on_event is not None:
            on_event(event)
    record = connection.call(
        "trainer", connection.trainer.GetRun, trainer_pb2.GetRunRequest(run_id=run_id)
    )
    _raise_if_failed(record.status, record.error, f"Run {run_id}")
    return RunResult.from_proto(record)


def _same_files(root: Path, files: list[export_pb2.ExportFile], top: str) -> bool:
    """Whether `root/top` already holds exactly these files (by checksum)."""
    return all(
        (root / file.name).is_file() and sha256_file(root / file.name) == file.sha256
        for file in files
        if file.name.split("/", 1)[0] == top
    )


def download_plan(result: export_pb2.ExportResult, output_dir: Path) -> dict[str, Path]:
    """Where each file of the export goes. A top-level name (a file, or the directory of an hf
    export) that already holds something else gets the export's own suffix, so one export never
    overwrites another's files; one that holds these very files is reused.

    The names come from the server (and its store): one that would leave `output_dir` (an
    absolute path, `..`) is PathOutsideDirectoryError, before any file is looked at."""
    for file in result.files:
        path_inside(output_dir, file.name)
    suffix = result.export_id.rsplit("-", 1)[-1]
    renamed: dict[str, str] = {}
    for file in result.files:
        top = file.name.split("/", 1)[0]
        if top in renamed:
            continue
        taken = (output_dir / top).exists() and not _same_files(output_dir, list(result.files), top)
        stem, extension = (
            (top.removesuffix(".gguf"), ".gguf") if top.endswith(".gguf") else (top, "")
        )
        renamed[top] = f"{stem}-{suffix}{extension}" if taken else top
    plan = {}
    for file in result.files:
        top, _, rest = file.name.partition("/")
        # The suffix is the server's too (its export id): the renamed name is checked again.
        plan[file.key] = path_inside(output_dir, f"{renamed[top]}/{rest}" if rest else renamed[top])
    return plan


def download_artifact(connection: Connection, key: str, dest: Path, sha256: str = "") -> Path:
    """Stream a stored file to `dest`; the final name appears only once it is complete and,
    when a checksum is given, verified.

    The bytes go to a hidden `.<name>.download` file first. An interrupted download (network,
    Ctrl-C, a restarted server) leaves it behind, and the next call for the same `dest` asks
    the server for the rest only. A file that is already there with the right checksum is
    kept as it is.
    """
    if sha256 and dest.is_file() and sha256_file(dest) == sha256:
        return dest
    partial = dest.with_name(f".{dest.name}.download")
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = partial.stat().st_size if partial.is_file() else 0
    request = export_pb2.DownloadArtifactRequest(key=key, offset=offset)
    try:
        with partial.open("ab") as handle:
            for chunk in connection.stream("export", connection.export.DownloadArtifact, request):
                handle.write(chunk.data)
    except BaseException:
        if partial.stat().st_size == 0:
            partial.unlink()  # nothing to resume: a refused key leaves no file behind
        raise
    if sha256 and sha256_file(partial) != sha256:
        partial.unlink()  # a stale partial of another file, or corrupted: start over next time
        raise ExportVerificationError(
            f"Downloaded {key} but its sha256 is not {sha256}.",
            hint="The transfer was corrupted; download it again.",
        )
    os.replace(partial, dest)  # created by open(), so with the user's usual permissions
    return dest


def _finished_export(
    connection: Connection,
    request: export_pb2.SubmitExportRequest,
    on_event: ExportEventHandler | None,
) -> export_pb2.ExportResult:
    """Submit an export, follow its events to the end, and return its record (or raise its
    error). Traced in its run's trace."""
    stub = connection.export
    with span("backprop export", run_id=request.run_id, parent=_run_trace(connection, request)):
        export_id = connection.call("export", stub.SubmitExport, request).export_id
        asked = export_pb2.GetExportRequest(export_id=export_id)
        result = followed_to_end(
            connection,
            "export",
            stub.WatchExport,
            lambda after: export_pb2.WatchExportRequest(export_id=export_id, after_event_id=after),
            lambda: connection.call("export", stub.GetExport, asked),
            on_event,
        )
    _raise_if_failed(result.status, result.error, f"Export {export_id}")
    return result


def _run_trace(connection: Connection, request: export_pb2.SubmitExportRequest) -> str:
    """The trace of the run an export is of, which the export joins (a run is one trace from
    its upload to its last export); "" when this process sends no spans."""
    if not recording():
        return ""
    asked = trainer_pb2.GetRunRequest(run_id=request.run_id)
    return connection.call("trainer", connection.trainer.GetRun, asked).trace_parent


def push(
    connection: Connection,
    run_id: str,
    repo: str,
    *,
    merged: bool = False,
    private: bool = False,
    on_event: ExportEventHandler | None = None,
) -> export_pb2.ExportResult:
    """Push a run's adapter (or, `merged`, the merged model) to the Hub with a model card."""
    request = export_pb2.SubmitExportRequest(
        run_id=run_id, format="hf" if merged else "adapter", hub_repo=repo, hub_private=private
    )
    return _finished_export(connection, request, on_event)


def export(
    connection: Connection,
    run_id: str,
    output_dir: Path,
    *,
    export_format: str = "gguf",
    quantization: str = "",
    prompt: str = "",
    on_event: ExportEventHandler | None = None,
) -> ExportResult:
    request = export_pb2.SubmitExportRequest(
        run_id=run_id, format=export_format, quantization=quantization, smoke_prompt=prompt
    )
    result = _finished_export(connection, request, on_event)
    plan = download_plan(result, output_dir)
    for file in result.files:
        download_artifact(connection, file.key, plan[file.key], file.sha256)
    main = plan[result.files[0].key]
    # A directory export (hf, adapter): its path is the directory, not its first file.
    path = main.parent if "/" in result.files[0].name else main
    return ExportResult.from_proto(result, path, [plan[file.key] for file in result.files])
