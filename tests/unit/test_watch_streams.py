"""A watch never outlives its job: WatchRun and WatchExport on a job whose record has ended but
whose terminal event is gone (trimmed, or never published) end by themselves, while a watch on a
job still to run stays open. The real trainer and export servicers run in a real gRPC server
over a local store and the embedded queue; records are written as a worker would have left
them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from service_processes import connected, in_process_stack

from backpropagate.connection import Connection
from backpropagate.v1 import common_pb2, export_pb2, trainer_pb2
from backpropagate_services.common.layout import export_record_key, run_record_key
from backpropagate_services.common.records import SETTLE_SECONDS, save_record
from backpropagate_services.common.settings import SafetySettings, Settings
from backpropagate_services.stack import RunningStack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    settings = Settings(home=tmp_path_factory.mktemp("home"), safety=SafetySettings(source="host"))
    with in_process_stack(settings, ["trainer", "export"], start_workers=False) as running:
        yield running


@pytest.fixture
def connection(stack: RunningStack) -> Iterator[Connection]:
    with connected(stack.address, ["trainer", "export"]) as client:
        yield client


def save_run(stack: RunningStack, run_id: str, status: int) -> None:
    record = trainer_pb2.RunRecord(run_id=run_id, status=status, attempts=1)
    save_record(stack.runtime.store, run_record_key(run_id), record)


def test_a_watch_on_a_run_that_ended_without_its_last_event_ends(
    stack: RunningStack, connection: Connection
) -> None:
    save_run(stack, "run-20261206T130000-aaaaaa", common_pb2.JOB_STATUS_FAILED)
    started = time.monotonic()

    events = list(
        connection.stream(
            "trainer",
            connection.trainer.WatchRun,
            trainer_pb2.WatchRunRequest(run_id="run-20261206T130000-aaaaaa"),
        )
    )

    assert events == []
    assert time.monotonic() - started < SETTLE_SECONDS + 5


def test_a_watch_on_an_export_that_ended_without_its_last_event_ends(
    stack: RunningStack, connection: Connection
) -> None:
    export_id = "export-20261206T130000-bbbbbb"
    result = export_pb2.ExportResult(export_id=export_id, status=common_pb2.JOB_STATUS_SUCCEEDED)
    save_record(stack.runtime.store, export_record_key(export_id), result)

    events = list(
        connection.stream(
            "export",
            connection.export.WatchExport,
            export_pb2.WatchExportRequest(export_id=export_id),
        )
    )

    assert events == []


def test_a_watch_on_a_run_still_queued_stays_open(stack: RunningStack) -> None:
    save_run(stack, "run-20261206T130000-cccccc", common_pb2.JOB_STATUS_QUEUED)

    with grpc.insecure_channel(stack.address) as channel:
        watch = channel.unary_stream(
            "/backpropagate.v1.TrainerService/WatchRun",
            request_serializer=trainer_pb2.WatchRunRequest.SerializeToString,
            response_deserializer=trainer_pb2.RunEvent.FromString,
        )
        call = watch(
            trainer_pb2.WatchRunRequest(run_id="run-20261206T130000-cccccc"),
            timeout=SETTLE_SECONDS + 3,
        )
        with pytest.raises(grpc.RpcError) as waited:
            list(call)

    assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
