"""The client side of each job: upload, submit, follow the events, fetch the result.

Shared by the SDK and the CLI. Failures come back as the server's BackpropagateError subclass,
whether the call itself failed or the job failed later on a worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from backpropagate.connection import Connection
from backpropagate.results import ExportResult, RunResult
from backpropagate.v1 import common_pb2, dataprep_pb2, export_pb2, trainer_pb2
from backpropagate_services.common.errors import (
    ExportVerificationError,
    JobCancelledError,
    NotFoundError,
)
from backpropagate_services.common.grpc_errors import detail_to_error
from backpropagate_services.common.store.base import sha256_file

UPLOAD_CHUNK_BYTES = 1024 * 1024

RunEventHandler = Callable[[trainer_pb2.RunEvent], None]
ExportEventHandler = Callable[[export_pb2.ExportEvent], None]


def _upload_requests(path: Path, format_hint: str) -> Iterator[dataprep_pb2.UploadDatasetRequest]:
    header = dataprep_pb2.UploadDatasetHeader(filename=path.name, format=format_hint)
    yield dataprep_pb2.UploadDatasetRequest(header=header)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(UPLOAD_CHUNK_BYTES), b""):
            yield dataprep_pb2.UploadDatasetRequest(chunk=chunk)


def require_dataset_file(path: Path) -> None:
    """NotFoundError unless `path` is a file; callers may check before connecting at all."""
    if not path.is_file():
        raise NotFoundError(
            f"Dataset file not found: {path}",
            hint="Pass the path of a JSONL file, e.g. examples/quickstart.jsonl.",
            path=str(path),
        )


def upload_dataset(
    connection: Connection, path: Path, format_hint: str = "auto"
) -> dataprep_pb2.DatasetInfo:
    require_dataset_file(path)
    stub = connection.dataprep
    return connection.call("dataprep", stub.UploadDataset, _upload_requests(path, format_hint))


def _raise_if_failed(status: int, error: common_pb2.ErrorDetail, what: str) -> None:
    if status == common_pb2.JOB_STATUS_FAILED:
        raise detail_to_error(error)
    if status == common_pb2.JOB_STATUS_CANCELLED:
        raise JobCancelledError(f"{what} was cancelled.")


def train(
    connection: Connection,
    dataset_id: str,
    config: trainer_pb2.TrainConfig,
    on_event: RunEventHandler | None = None,
) -> RunResult:
    stub = connection.trainer
    submitted = connection.call(
        "trainer",
        stub.SubmitTrain,
        trainer_pb2.SubmitTrainRequest(dataset_id=dataset_id, config=config),
    )
    return follow_run(connection, submitted.run_id, on_event)


def follow_run(
    connection: Connection, run_id: str, on_event: RunEventHandler | None = None
) -> RunResult:
    stub = connection.trainer
    for event in connection.stream(
        "trainer", stub.WatchRun, trainer_pb2.WatchRunRequest(run_id=run_id)
    ):
        if on_event is not None:
            on_event(event)
    record = connection.call("trainer", stub.GetRun, trainer_pb2.GetRunRequest(run_id=run_id))
    _raise_if_failed(record.status, record.error, f"Run {run_id}")
    return RunResult.from_proto(record)


def _unique_destination(dest: Path, sha256: str, export_id: str) -> Path:
    """`dest`, unless a different file already has that name: then the export's own suffix is
    added, so one export never overwrites another's file."""
    if not dest.exists() or (sha256 and sha256_file(dest) == sha256):
        return dest
    return dest.with_stem(f"{dest.stem}-{export_id.rsplit('-', 1)[-1]}")


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
    with partial.open("ab") as handle:
        for chunk in connection.stream("export", connection.export.DownloadArtifact, request):
            handle.write(chunk.data)
    if sha256 and sha256_file(partial) != sha256:
        partial.unlink()  # a stale partial of another file, or corrupted: start over next time
        raise ExportVerificationError(
            f"Downloaded {key} but its sha256 is not {sha256}.",
            hint="The transfer was corrupted; download it again.",
        )
    os.replace(partial, dest)  # created by open(), so with the user's usual permissions
    return dest


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
    stub = connection.export
    request = export_pb2.SubmitExportRequest(
        run_id=run_id, format=export_format, quantization=quantization, smoke_prompt=prompt
    )
    export_id = connection.call("export", stub.SubmitExport, request).export_id
    for event in connection.stream(
        "export", stub.WatchExport, export_pb2.WatchExportRequest(export_id=export_id)
    ):
        if on_event is not None:
            on_event(event)
    result = connection.call(
        "export", stub.GetExport, export_pb2.GetExportRequest(export_id=export_id)
    )
    _raise_if_failed(result.status, result.error, f"Export {export_id}")
    dest = _unique_destination(
        output_dir / Path(result.artifact_key).name, result.sha256, result.export_id
    )
    path = download_artifact(connection, result.artifact_key, dest, result.sha256)
    return ExportResult.from_proto(result, path)
