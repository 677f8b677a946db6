"""Errors cross the wire as themselves: a servicer raises DatasetSchemaError, the client catches
DatasetSchemaError, with the same code, context and hint.

The real dataprep and safety servicers run in a real gRPC server on a free loopback port, and the
client reaches them through the same `Connection` and workflows the CLI uses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_processes import connected, in_process_stack

from backpropagate.connection import Connection
from backpropagate.workflows import upload_dataset
from backpropagate_api import errors
from backpropagate_api.errors import (
    EXIT_PARTIAL_FAILURE,
    EXIT_RUNTIME_ERROR,
    EXIT_USER_ERROR,
    BackpropagateError,
    DatasetSchemaError,
    NotFoundError,
    ServiceUnavailableError,
    all_error_classes,
    rebuild_error,
)
from backpropagate_api.settings import SafetySettings, Settings
from backpropagate_api.uploads import prepared_dataset_id
from backpropagate_api.v1 import dataprep_pb2
from backpropagate_services.dataprep.server import SERVICE_NAME as DATAPREP_SERVICE
from backpropagate_services.safety.server import SERVICE_NAME as SAFETY_SERVICE
from backpropagate_services.stack import RunningStack, start_stack

GOOD_ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]},
]


def host_only_settings(home: Path) -> Settings:
    return Settings(home=home, safety=SafetySettings(source="host"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    home = tmp_path_factory.mktemp("home")
    with in_process_stack(host_only_settings(home), ["dataprep", "safety"]) as running:
        yield running


@pytest.fixture
def connection(stack: RunningStack) -> Iterator[Connection]:
    with connected(stack.address, ["dataprep", "safety"]) as client:
        yield client


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- the error's class, code and context survive the call ---------------------------------------


def test_malformed_upload_raises_dataset_schema_error_with_line_file_and_field(
    connection: Connection, tmp_path: Path
) -> None:
    bad_row = {"messages": [{"role": "robot", "content": "beep"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_ROWS[0], bad_row])

    with pytest.raises(DatasetSchemaError) as caught:
        upload_dataset(connection, path, strict=True)

    error = caught.value
    assert type(error) is DatasetSchemaError
    assert error.code == "INPUT_DATASET_SCHEMA"
    assert error.context == {"filename": "bad.jsonl", "line": "2", "field": "messages[0].role"}
    assert error.message.startswith("bad.jsonl line 2: field 'messages[0].role'")
    assert error.hint == DatasetSchemaError.default_hint
    assert error.__cause__ is None  # re-raised from the status, not a wrapped RpcError


def test_upload_of_a_file_that_is_not_there_fails_before_any_call(
    connection: Connection, tmp_path: Path
) -> None:
    with pytest.raises(NotFoundError) as caught:
        upload_dataset(connection, tmp_path / "missing.jsonl")

    assert caught.value.context == {"path": str(tmp_path / "missing.jsonl")}


def test_inspecting_an_unknown_dataset_raises_not_found(connection: Connection) -> None:
    unknown = "0" * 64

    with pytest.raises(NotFoundError) as caught:
        connection.call(
            "dataprep",
            connection.dataprep.InspectDataset,
            dataprep_pb2.InspectDatasetRequest(dataset_id=unknown),
        )

    assert caught.value.context == {"dataset_id": unknown}
    assert "Upload it first" in caught.value.hint


# --- successful uploads ------------------------------------------------------------------------


def test_good_upload_is_addressed_by_its_bytes_and_the_options_it_was_prepared_with(
    connection: Connection, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "good.jsonl", GOOD_ROWS)

    info = upload_dataset(connection, path)

    header = dataprep_pb2.UploadDatasetHeader(filename="good.jsonl", format="auto")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.dataset_id == prepared_dataset_id(digest, header)
    assert info.format == "openai"
    assert info.num_examples == 2
    assert info.num_turns == 4
    assert info.size_bytes == path.stat().st_size
    assert info.filename == "good.jsonl"
    assert json.loads(info.preview_json) == GOOD_ROWS[0]["messages"]


def test_the_same_gzipped_bytes_under_another_inner_extension_are_another_dataset() -> None:
    def named(filename: str) -> str:
        return prepared_dataset_id("0" * 64, dataprep_pb2.UploadDatasetHeader(filename=filename))

    assert named("rows.csv.gz") != named("rows.jsonl.gz")
    assert named("a.csv.gz") == named("B.CSV.GZ") and named("a.csv") != named("a.csv.gz")


def test_the_same_file_prepared_the_same_way_is_found_not_prepared_again(
    connection: Connection, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "again.jsonl", [*GOOD_ROWS, GOOD_ROWS[0]])
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(path.read_bytes())

    first = upload_dataset(connection, path)
    again = upload_dataset(connection, copy)  # another name, the same bytes
    deduplicated = upload_dataset(connection, path, dedup="exact")
    # A client that sends without looking first: the service finds it too.
    header = dataprep_pb2.UploadDatasetHeader(filename=path.name)
    chunks = [dataprep_pb2.UploadDatasetRequest(chunk=path.read_bytes())]
    sent = connection.dataprep.UploadDataset(
        iter([dataprep_pb2.UploadDatasetRequest(header=header), *chunks])
    )

    assert (first.reused, again.reused, deduplicated.reused, sent.reused) == (
        False,
        True,
        False,
        True,
    )
    assert again.dataset_id == sent.dataset_id == first.dataset_id != deduplicated.dataset_id
    assert (first.num_examples, deduplicated.num_examples) == (3, 2)
    again.reused = False
    assert again == first  # the first preparation's record, filename included


def test_inspecting_an_uploaded_dataset_returns_what_the_upload_returned(
    connection: Connection, tmp_path: Path
) -> None:
    # Rows no other test uploads: a first preparation, not one found again.
    uploaded = upload_dataset(connection, write_jsonl(tmp_path / "good.jsonl", GOOD_ROWS[::-1]))

    inspected = connection.call(
        "dataprep",
        connection.dataprep.InspectDataset,
        dataprep_pb2.InspectDatasetRequest(dataset_id=uploaded.dataset_id),
    )

    assert inspected == uploaded


def test_uploading_the_same_bytes_twice_gives_the_same_id(
    connection: Connection, tmp_path: Path
) -> None:
    first = upload_dataset(connection, write_jsonl(tmp_path / "a.jsonl", GOOD_ROWS))
    second = upload_dataset(connection, write_jsonl(tmp_path / "b.jsonl", GOOD_ROWS))
    different = upload_dataset(connection, write_jsonl(tmp_path / "c.jsonl", GOOD_ROWS[:1]))

    assert first.dataset_id == second.dataset_id
    assert different.dataset_id != first.dataset_id


# --- standard services -------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", DATAPREP_SERVICE, SAFETY_SERVICE])
def test_health_reports_serving_overall_and_per_service(stack: RunningStack, service: str) -> None:
    with grpc.insecure_channel(stack.address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )

    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_does_not_know_a_service_the_server_does_not_run(stack: RunningStack) -> None:
    with grpc.insecure_channel(stack.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Check(health_pb2.HealthCheckRequest(service="backpropagate.v1.TrainerService"))

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_our_services_and_the_standard_ones(stack: RunningStack) -> None:
    with grpc.insecure_channel(stack.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = stub.ServerReflectionInfo(iter([request]), timeout=5)

    listed = {service.name for service in response.list_services_response.service}
    assert listed == {
        DATAPREP_SERVICE,
        SAFETY_SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


# --- an unreachable server ---------------------------------------------------------------------


def test_calling_a_stopped_server_raises_service_unavailable_not_rpc_error(
    tmp_path: Path,
) -> None:
    stopped = start_stack(host_only_settings(tmp_path), ["dataprep"], "127.0.0.1:0")
    stopped.stop(grace=0)
    client = Connection(addresses={"dataprep": stopped.address}, embedded=False)
    request = dataprep_pb2.InspectDatasetRequest(dataset_id="x")

    try:
        with pytest.raises(ServiceUnavailableError) as caught:
            client.call("dataprep", client.dataprep.InspectDataset, request, timeout=5)
    finally:
        client.close()

    error = caught.value
    assert not isinstance(error, grpc.RpcError)
    assert error.code == "DEP_SERVICE_UNAVAILABLE"
    assert error.retryable
    assert error.context == {"endpoint": stopped.address}
    assert stopped.address in error.message


# --- the error registry, without a server ------------------------------------------------------


def test_rebuilding_a_known_code_gives_its_class_with_message_hint_and_context() -> None:
    error = rebuild_error("INPUT_DATASET_SCHEMA", "bad row", "fix it", {"line": "3"})

    assert type(error) is DatasetSchemaError
    assert (error.message, error.hint, error.context) == ("bad row", "fix it", {"line": "3"})


def test_rebuilding_an_unknown_code_keeps_the_code_visible() -> None:
    error = rebuild_error("RUNTIME_FROM_A_NEWER_VERSION", "it broke", "upgrade")

    assert type(error) is BackpropagateError
    assert error.code == "RUNTIME_FROM_A_NEWER_VERSION"
    assert str(error) == "[RUNTIME_FROM_A_NEWER_VERSION] it broke"
    assert error.to_dict()["code"] == "RUNTIME_FROM_A_NEWER_VERSION"
    assert BackpropagateError.code == "INTERNAL"  # the class itself is untouched


def test_every_error_class_has_a_unique_code() -> None:
    codes = [cls.code for cls in all_error_classes()]

    assert len(codes) == len(set(codes)), sorted(codes)


def test_every_error_class_has_a_cli_exit_code_and_a_real_grpc_status() -> None:
    for cls in all_error_classes():
        assert cls.exit_code in {EXIT_USER_ERROR, EXIT_RUNTIME_ERROR, EXIT_PARTIAL_FAILURE}, cls
        assert hasattr(grpc.StatusCode, cls.grpc_status), cls


def test_the_registry_holds_every_error_class_the_errors_module_defines() -> None:
    defined = {
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, BackpropagateError)
    }

    assert set(all_error_classes()) == defined
