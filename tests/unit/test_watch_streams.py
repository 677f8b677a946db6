"""A watch never outlives its job: WatchRun and WatchExport on a job whose record has ended but
whose terminal event is gone (trimmed, or never published) end by themselves, while a watch on a
job still to run stays open, until the server's idle timeout; the client then watches again
after the last event it saw. The real trainer and export servicers run in a real gRPC server
over a local store and the embedded queue; records are written as a worker would have left
them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from service_processes import connected, in_process_stack

from backpropagate.connection import Connection
from backpropagate.workflows import follow_run
from backpropagate_api.errors import UserError
from backpropagate_api.layout import (
    export_record_key,
    run_events_channel,
    run_record_key,
)
from backpropagate_api.settings import SafetySettings, ServerSettings, Settings
from backpropagate_api.v1 import common_pb2, export_pb2, trainer_pb2
from backpropagate_services.common.records import SETTLE_SECONDS, save_record, to_json
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


def publish(stack: RunningStack, run_id: str, step: int, status: int) -> None:
    event = trainer_pb2.RunEvent(run_id=run_id, step=step, status=status, attempt=1)
    stack.runtime.queue.publish(run_events_channel(run_id), to_json(event))


def test_a_watch_goes_on_after_the_event_it_names(
    stack: RunningStack, connection: Connection
) -> None:
    run_id = "run-20261206T130000-dddddd"
    for step in (1, 2, 3):
        publish(stack, run_id, step, common_pb2.JOB_STATUS_RUNNING)
    publish(stack, run_id, 3, common_pb2.JOB_STATUS_SUCCEEDED)
    save_run(stack, run_id, common_pb2.JOB_STATUS_SUCCEEDED)

    def watch(after: str) -> list[trainer_pb2.RunEvent]:
        request = trainer_pb2.WatchRunRequest(run_id=run_id, after_event_id=after)
        return list(connection.stream("trainer", connection.trainer.WatchRun, request))

    everything = watch("")
    assert [event.step for event in everything] == [1, 2, 3, 3]
    assert len({event.event_id for event in everything}) == 4 and all(
        event.event_id for event in everything
    )
    rest = watch(everything[1].event_id)
    assert [(event.step, event.event_id) for event in rest] == [
        (event.step, event.event_id) for event in everything[2:]
    ]


def test_a_watch_after_an_event_id_the_queue_never_made_is_invalid_input(
    stack: RunningStack, connection: Connection
) -> None:
    run_id = "run-20261206T130000-abcdef"
    publish(stack, run_id, 1, common_pb2.JOB_STATUS_RUNNING)
    save_run(stack, run_id, common_pb2.JOB_STATUS_RUNNING)
    request = trainer_pb2.WatchRunRequest(run_id=run_id, after_event_id="1-0")  # Redis's shape

    with pytest.raises(UserError) as refused:
        list(connection.stream("trainer", connection.trainer.WatchRun, request))

    assert refused.value.code == "INPUT_INVALID"
    assert "after_event_id" in refused.value.message


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A stack whose watches end after 1 s without an event."""
    settings = Settings(
        home=tmp_path_factory.mktemp("impatient"),
        safety=SafetySettings(source="host"),
        server=ServerSettings(watch_idle_seconds=1.0),
    )
    with in_process_stack(settings, ["trainer", "export"], start_workers=False) as running:
        yield running


def test_a_watch_on_a_job_that_never_moves_ends_after_the_idle_timeout(
    impatient: RunningStack,
) -> None:
    save_run(impatient, "run-20261206T130000-eeeeee", common_pb2.JOB_STATUS_QUEUED)
    started = time.monotonic()
    with connected(impatient.address, ["trainer"]) as client:
        request = trainer_pb2.WatchRunRequest(run_id="run-20261206T130000-eeeeee")
        assert list(client.stream("trainer", client.trainer.WatchRun, request)) == []
    assert 1.0 <= time.monotonic() - started < SETTLE_SECONDS  # idle, not settled


def test_following_a_run_takes_up_watches_that_ended_idle_without_repeating_events(
    impatient: RunningStack,
) -> None:
    """Events 2.5 s apart, watches that end after 1 s of quiet: the client sees each once."""
    run_id = "run-20261206T130000-ffffff"
    save_run(impatient, run_id, common_pb2.JOB_STATUS_RUNNING)

    def work() -> None:
        for step in (1, 2, 3):
            publish(impatient, run_id, step, common_pb2.JOB_STATUS_RUNNING)
            time.sleep(2.5)
        save_run(impatient, run_id, common_pb2.JOB_STATUS_SUCCEEDED)
        publish(impatient, run_id, 3, common_pb2.JOB_STATUS_SUCCEEDED)

    worker = threading.Thread(target=work)
    worker.start()
    seen: list[trainer_pb2.RunEvent] = []
    with connected(impatient.address, ["trainer"]) as client:
        result = follow_run(client, run_id, seen.append)
    worker.join()

    assert result.status == "succeeded"
    assert [(event.step, event.status) for event in seen] == [
        (1, common_pb2.JOB_STATUS_RUNNING),
        (2, common_pb2.JOB_STATUS_RUNNING),
        (3, common_pb2.JOB_STATUS_RUNNING),
        (3, common_pb2.JOB_STATUS_SUCCEEDED),
    ]
