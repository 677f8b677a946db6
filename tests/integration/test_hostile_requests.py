"""Hostile requests get one stable answer from every service, whatever the store.

A real `backprop serve all` process runs once over the S3 store (moto) and once over the local
directory store. First, every request that names a run, an export or a dataset is sent with ids
that would name a path (`../../etc/passwd`, `/etc/passwd`) or are no ids at all. Each is answered
NOT_FOUND with the stable code before any store is asked, and nothing is created.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import servers
from service_processes import serve, settings_of, stack_env

from backpropagate.connection import Connection
from backpropagate.workflows import upload_dataset
from backpropagate_api.errors import BackpropagateError
from backpropagate_api.grpc_errors import error_from_rpc
from backpropagate_api.v1 import dataprep_pb2, export_pb2, safety_pb2, trainer_pb2
from backpropagate_services.common.store.base import ArtifactStore, make_store
from backpropagate_services.stack import SERVICES

HOSTILE_IDS = [
    "../../etc/passwd",
    "/etc/passwd",
    "run-1/../../datasets",
    "..",
    "a b",
    "run\x00",
    "x" * 300,
    "",
]


@dataclass
class Stack:
    connection: Connection
    store: ArtifactStore  # the one the served stack writes, to see that nothing changed
    dataset_id: str  # a real dataset, so that a config is judged on its own


@pytest.fixture(scope="module", params=["s3", "local"])
def stack(
    request: pytest.FixtureRequest,
    redis_url: str,
    s3_endpoint: str,
    model_cache: Path,
    quickstart: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp(f"hostile-{request.param}")
    env = stack_env(redis_url, s3_endpoint, model_cache, home, STORE__BACKEND=request.param)
    address = servers.free_address()
    with serve("all", address, env, log_path=home / "serve.log"):
        client = Connection(dict.fromkeys(SERVICES, address), embedded=False)
        try:
            dataset_id = upload_dataset(client, quickstart).dataset_id
            yield Stack(client, make_store(settings_of(env)), dataset_id)
        finally:
            client.close()


@pytest.fixture
def connection(stack: Stack) -> Connection:
    return stack.connection


def calls(connection: Connection, bad: str) -> dict[str, Callable[[], object]]:
    trainer, export, dataprep = connection.trainer, connection.export, connection.dataprep

    def unary(service: str, method: Callable, request: object) -> Callable[[], object]:
        return lambda: connection.call(service, method, request)

    def stream(service: str, method: Callable, request: object) -> Callable[[], object]:
        return lambda: list(connection.stream(service, method, request))

    return {
        "GetRun": unary("trainer", trainer.GetRun, trainer_pb2.GetRunRequest(run_id=bad)),
        "ResumeRun": unary("trainer", trainer.ResumeRun, trainer_pb2.ResumeRunRequest(run_id=bad)),
        "CancelRun": unary("trainer", trainer.CancelRun, trainer_pb2.CancelRunRequest(run_id=bad)),
        "WatchRun": stream("trainer", trainer.WatchRun, trainer_pb2.WatchRunRequest(run_id=bad)),
        "SubmitTrain": unary(
            "trainer", trainer.SubmitTrain, trainer_pb2.SubmitTrainRequest(dataset_id=bad)
        ),
        "SubmitMultiRun": unary(
            "trainer",
            trainer.SubmitMultiRun,
            trainer_pb2.SubmitMultiRunRequest(dataset_ids=[bad]),
        ),
        "InspectDataset": unary(
            "dataprep",
            dataprep.InspectDataset,
            dataprep_pb2.InspectDatasetRequest(dataset_id=bad),
        ),
        "SubmitExport": unary(
            "export", export.SubmitExport, export_pb2.SubmitExportRequest(run_id=bad)
        ),
        "GetExport": unary("export", export.GetExport, export_pb2.GetExportRequest(export_id=bad)),
        "CancelExport": unary(
            "export", export.CancelExport, export_pb2.CancelExportRequest(export_id=bad)
        ),
        "WatchExport": stream(
            "export", export.WatchExport, export_pb2.WatchExportRequest(export_id=bad)
        ),
    }


@pytest.mark.parametrize("bad", HOSTILE_IDS, ids=lambda bad: repr(bad)[:20])
def test_every_request_naming_a_hostile_id_is_not_found_and_changes_nothing(
    connection: Connection, bad: str
) -> None:
    answers = {}
    for name, call in calls(connection, bad).items():
        with pytest.raises(BackpropagateError) as refused:
            call()
        answers[name] = refused.value.code

    assert answers == dict.fromkeys(answers, "INPUT_NOT_FOUND")
    listed = connection.call("trainer", connection.trainer.ListRuns, trainer_pb2.ListRunsRequest())
    assert list(listed.runs) == []


SERVICE_NAMES = {
    "dataprep": "DataprepService",
    "trainer": "TrainerService",
    "export": "ExportService",
    "safety": "SafetyService",
}
GARBAGE = b"\xff\xff\xff\xff\x0f"  # a field header whose length runs past the end


def as_error(call: Callable[[], object]) -> Callable[[], object]:
    """`call` with a failed raw gRPC call raised as our error, as the client raises it."""

    def raising() -> object:
        try:
            return call()
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    return raising


def raw_unary(connection: Connection, service: str, method: str, payload: bytes) -> Callable:
    """`payload` sent as the request's bytes, whatever they are."""
    path = f"/backpropagate.v1.{SERVICE_NAMES[service]}/{method}"
    return as_error(lambda: connection.channel(service).unary_unary(path)(payload, timeout=30))


def raw_upload(connection: Connection, payloads: list[bytes]) -> Callable:
    path = "/backpropagate.v1.DataprepService/UploadDataset"
    return as_error(
        lambda: connection.channel("dataprep").stream_unary(path)(iter(payloads), timeout=30)
    )


def upload(connection: Connection, messages: list[dataprep_pb2.UploadDatasetRequest]) -> Callable:
    stub = connection.dataprep
    return lambda: connection.call("dataprep", stub.UploadDataset, iter(messages))


def header(**fields: object) -> dataprep_pb2.UploadDatasetRequest:
    values = {"filename": "rows.jsonl", **fields}
    return dataprep_pb2.UploadDatasetRequest(header=dataprep_pb2.UploadDatasetHeader(**values))


ROW = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'


def chunk(data: bytes) -> dataprep_pb2.UploadDatasetRequest:
    return dataprep_pb2.UploadDatasetRequest(chunk=data)


def hostile_requests(stack: Stack) -> dict[str, tuple[Callable[[], object], str]]:
    """Each hostile request, and the code it must be answered with."""
    connection, trainer = stack.connection, stack.connection.trainer

    def train(**fields: object) -> Callable[[], object]:
        config = trainer_pb2.TrainConfig(**fields)  # type: ignore[arg-type]
        request = trainer_pb2.SubmitTrainRequest(dataset_id=stack.dataset_id, config=config)
        return lambda: connection.call("trainer", trainer.SubmitTrain, request)

    def estimate(**fields: object) -> Callable[[], object]:
        config = trainer_pb2.TrainConfig(**fields)  # type: ignore[arg-type]
        request = trainer_pb2.EstimateMemoryRequest(dataset_id=stack.dataset_id, config=config)
        return lambda: connection.call("trainer", trainer.EstimateMemory, request)

    def campaign(**fields: object) -> Callable[[], object]:
        request = trainer_pb2.SubmitMultiRunRequest(
            dataset_ids=[stack.dataset_id],
            multi_run=trainer_pb2.MultiRunConfig(**fields),  # type: ignore[arg-type]
        )
        return lambda: connection.call("trainer", trainer.SubmitMultiRun, request)

    def listing(**fields: object) -> Callable[[], object]:
        request = trainer_pb2.ListRunsRequest(**fields)  # type: ignore[arg-type]
        return lambda: connection.call("trainer", trainer.ListRuns, request)

    def download(**fields: object) -> Callable[[], object]:
        request = export_pb2.DownloadArtifactRequest(**fields)  # type: ignore[arg-type]
        return lambda: list(
            connection.stream("export", connection.export.DownloadArtifact, request)
        )

    def export(**fields: object) -> Callable[[], object]:
        request = export_pb2.SubmitExportRequest(run_id="run-20261206T000000-000000", **fields)  # type: ignore[arg-type]
        return lambda: connection.call("export", connection.export.SubmitExport, request)

    def import_adapter(messages: list[trainer_pb2.ImportAdapterRequest]) -> Callable[[], object]:
        return lambda: connection.call("trainer", trainer.ImportAdapter, iter(messages))

    adapter_header = trainer_pb2.ImportAdapterRequest(
        header=trainer_pb2.ImportAdapterHeader(base_model="smollm2")
    )

    def adapter_file(path: str, data: bytes = b"{}") -> trainer_pb2.ImportAdapterRequest:
        return trainer_pb2.ImportAdapterRequest(
            chunk=trainer_pb2.AdapterFileChunk(path=path, data=data)
        )

    def adapter_with_config(config: bytes) -> Callable[[], object]:
        weights = adapter_file("adapter_model.safetensors", b"")
        return import_adapter(
            [adapter_header, adapter_file("adapter_config.json", config), weights]
        )

    def watch_run(after: str) -> Callable[[], object]:
        request = trainer_pb2.WatchRunRequest(
            run_id="run-20261206T000000-000000", after_event_id=after
        )
        return lambda: list(connection.stream("trainer", trainer.WatchRun, request))

    def watch_export(after: str) -> Callable[[], object]:
        request = export_pb2.WatchExportRequest(
            export_id="export-20261206T000000-000000", after_event_id=after
        )
        return lambda: list(connection.stream("export", connection.export.WatchExport, request))

    invalid, config, model = "INPUT_INVALID", "INPUT_CONFIG_INVALID", "INPUT_MODEL_NOT_FOUND"
    return {
        # Bytes that are no message of the method's type.
        "GetRun garbage bytes": (raw_unary(connection, "trainer", "GetRun", GARBAGE), invalid),
        "SubmitTrain garbage bytes": (
            raw_unary(connection, "trainer", "SubmitTrain", GARBAGE),
            invalid,
        ),
        "SubmitExport garbage bytes": (
            raw_unary(connection, "export", "SubmitExport", GARBAGE),
            invalid,
        ),
        "Snapshot garbage bytes": (raw_unary(connection, "safety", "Snapshot", GARBAGE), invalid),
        "upload garbage after its header": (
            raw_upload(connection, [header().SerializeToString(), GARBAGE]),
            invalid,
        ),
        # Unknown enum values and numbers out of range.
        "ListRuns unknown status": (listing(status=99), invalid),
        "ListRuns negative page size": (listing(page_size=-1), invalid),
        "ListRuns forged page token": (listing(page_token="../../etc/passwd"), invalid),
        "steps 2^31-1": (train(steps=2**31 - 1), config),
        "batch size a million": (train(steps=5, batch_size=1_000_000), config),
        "max length 10^8": (train(steps=5, max_length=100_000_000), config),
        "LoRA rank a million": (train(steps=5, lora_r=1_000_000), config),
        "learning rate NaN": (train(steps=5, learning_rate=float("nan")), config),
        "learning rate negative": (train(steps=5, learning_rate=-1.0), config),
        "learning rate infinite": (train(steps=5, learning_rate=float("inf")), config),
        "unknown method": (train(steps=5, method="rlhf; rm -rf /"), config),
        "unknown adapter": (train(steps=5, adapter="../../evil"), config),
        "epochs a billion": (train(epochs=1e9), config),
        "estimate with rank a million": (estimate(lora_r=1_000_000), config),
        "campaign of a million runs": (campaign(runs=1_000_000), config),
        "campaign with an unknown merge": (campaign(runs=2, merge="evil"), config),
        # Model names that are paths out of bounds or no names at all.
        "base model /etc/passwd": (train(steps=5, base_model="/etc/passwd"), model),
        "base model ../../../../etc": (train(steps=5, base_model="../../../../etc"), model),
        "base model of a megabyte": (train(steps=5, base_model="x" * 1_000_000), model),
        "base model with a shell in it": (train(steps=5, base_model="a;rm -rf /"), model),
        # Streams that are empty, out of order, or name paths.
        "empty upload stream": (upload(connection, []), invalid),
        "upload without its header": (upload(connection, [chunk(ROW)]), invalid),
        "upload of a header alone": (upload(connection, [header()]), "INPUT_DATASET_EMPTY"),
        "upload in an unknown format": (
            upload(connection, [header(format="evil"), chunk(ROW)]),
            "INPUT_DATASET_FORMAT_UNKNOWN",
        ),
        "upload with an unknown dedup": (
            upload(connection, [header(dedup="evil"), chunk(ROW)]),
            config,
        ),
        "empty adapter import": (import_adapter([]), invalid),
        "adapter file named ../../etc/passwd": (
            import_adapter([adapter_header, adapter_file("../../etc/passwd")]),
            invalid,
        ),
        "adapter file named /etc/passwd": (
            import_adapter([adapter_header, adapter_file("/etc/passwd")]),
            invalid,
        ),
        "adapter file named .": (import_adapter([adapter_header, adapter_file(".")]), invalid),
        "adapter file named with a NUL": (
            import_adapter([adapter_header, adapter_file("adapter\x00config.json")]),
            invalid,
        ),
        "adapter file name of 300 characters": (
            import_adapter([adapter_header, adapter_file("x" * 300)]),
            invalid,
        ),
        "adapter file under a file of the same name": (
            import_adapter([adapter_header, adapter_file("a"), adapter_file("a/b")]),
            invalid,
        ),
        "adapter file where a directory of the same name is": (
            import_adapter([adapter_header, adapter_file("a/b"), adapter_file("a")]),
            invalid,
        ),
        "adapter config that is a list": (adapter_with_config(b"[]"), invalid),
        "adapter of rank a million": (adapter_with_config(b'{"r": 1000000}'), invalid),
        "adapter with a layer of rank a million": (
            adapter_with_config(b'{"r": 8, "rank_pattern": {"q_proj": 1000000}}'),
            invalid,
        ),
        "adapter of rank 1.5": (adapter_with_config(b'{"r": 1.5}'), invalid),
        "adapter from a base model of 5000 characters": (
            import_adapter(
                [
                    trainer_pb2.ImportAdapterRequest(
                        header=trainer_pb2.ImportAdapterHeader(base_model="m" * 5000)
                    ),
                    adapter_file("adapter_config.json"),
                    adapter_file("adapter_model.safetensors", b""),
                ]
            ),
            model,
        ),
        # Cursors that are no event id, ids and names far too long to be any.
        "watch a run after event evil": (watch_run("evil"), invalid),
        "watch a run after an event id past 2^64": (
            watch_run("99999999999999999999999-0"),
            invalid,
        ),
        "watch a run after an event id of 5000 digits": (watch_run("1" * 5000), invalid),
        "watch an export after event 1-2-3": (watch_export("1-2-3"), invalid),
        "run id of 5000 characters": (
            lambda: connection.call(
                "trainer", trainer.GetRun, trainer_pb2.GetRunRequest(run_id="r" * 5000)
            ),
            "INPUT_NOT_FOUND",
        ),
        "push to a Hub repo of 5000 characters": (
            export(format="adapter", hub_repo="me/" + "x" * 5000),
            config,
        ),
        "download of a dataset's key": (
            download(key=f"datasets/{stack.dataset_id}/rows.jsonl"),
            "INPUT_ARTIFACT_NOT_DOWNLOADABLE",
        ),
        "download of ../../etc/passwd": (
            download(key="../../etc/passwd"),
            "INPUT_ARTIFACT_NOT_DOWNLOADABLE",
        ),
        "export in an unknown format": (export(format="exe"), config),
        "export at an unknown quantisation": (export(quantization="q1_evil"), config),
        "export with a megabyte smoke prompt": (export(smoke_prompt="why? " * 200_000), config),
        "push to a Hub repo named ../evil": (export(format="adapter", hub_repo="../evil"), config),
        "safety watch every -1 s": (
            lambda: list(
                connection.stream(
                    "safety",
                    connection.safety.Watch,
                    safety_pb2.WatchSafetyRequest(interval_seconds=-1),
                )
            ),
            config,
        ),
    }


# What a refusal may take to say what was wrong: an input far longer is not echoed whole.
MAX_MESSAGE_CHARS = 600


def test_every_hostile_request_gets_its_stable_code_and_changes_nothing(stack: Stack) -> None:
    before = stack.store.list("")
    answers, expected, long_messages = {}, {}, {}
    for name, (call, code) in hostile_requests(stack).items():
        expected[name] = code
        try:
            call()
            answers[name] = "(answered)"
        except BackpropagateError as refused:
            answers[name] = refused.code
            if len(str(refused)) > MAX_MESSAGE_CHARS:
                long_messages[name] = str(refused)

    assert len(expected) >= 30
    assert answers == expected
    assert long_messages == {}  # a long input is named, not echoed whole
    assert stack.store.list("") == before  # nothing stored, nothing removed
    runs = stack.connection.call(
        "trainer", stack.connection.trainer.ListRuns, trainer_pb2.ListRunsRequest()
    )
    assert list(runs.runs) == []


def test_a_client_that_leaves_mid_upload_leaves_nothing_and_the_server_answering(
    stack: Stack,
) -> None:
    before = stack.store.list("")
    sent = threading.Event()

    def requests() -> Iterator[dataprep_pb2.UploadDatasetRequest]:
        yield header(filename="half.jsonl")
        for _ in range(50):
            yield chunk(ROW * 200)
        sent.set()
        time.sleep(30)  # the rest never comes: the client goes first
        yield chunk(ROW)

    future = stack.connection.dataprep.UploadDataset.future(requests(), timeout=60)
    assert sent.wait(30)
    future.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()

    assert stack.store.list("") == before
    again = upload_dataset(
        stack.connection, Path(__file__).parents[2] / "examples" / "quickstart.jsonl"
    )
    assert again.dataset_id == stack.dataset_id and again.reused


LONG = "x" * 5000


def long_fields(stack: Stack) -> dict[str, tuple[Callable[[], object], str]]:
    """A request whose one field is 5000 characters, for fields a refusal names; and its code."""
    connection, trainer = stack.connection, stack.connection.trainer

    def train(**fields: object) -> Callable[[], object]:
        config = trainer_pb2.TrainConfig(steps=5, **fields)  # type: ignore[arg-type]
        request = trainer_pb2.SubmitTrainRequest(dataset_id=stack.dataset_id, config=config)
        return lambda: connection.call("trainer", trainer.SubmitTrain, request)

    def export(**fields: object) -> Callable[[], object]:
        request = export_pb2.SubmitExportRequest(run_id="run-20261206T000000-000000", **fields)  # type: ignore[arg-type]
        return lambda: connection.call("export", connection.export.SubmitExport, request)

    def upload_with(**fields: object) -> Callable[[], object]:
        return upload(connection, [header(**fields), chunk(ROW)])

    campaign = trainer_pb2.SubmitMultiRunRequest(
        dataset_ids=[stack.dataset_id], multi_run=trainer_pb2.MultiRunConfig(runs=2, merge=LONG)
    )
    download = export_pb2.DownloadArtifactRequest(key=LONG)
    config, invalid = "INPUT_CONFIG_INVALID", "INPUT_INVALID"
    return {
        "run id": (
            lambda: connection.call(
                "trainer", trainer.GetRun, trainer_pb2.GetRunRequest(run_id=LONG)
            ),
            "INPUT_NOT_FOUND",
        ),
        "dataset id": (
            lambda: connection.call(
                "trainer", trainer.SubmitTrain, trainer_pb2.SubmitTrainRequest(dataset_id=LONG)
            ),
            "INPUT_NOT_FOUND",
        ),
        "page token": (
            lambda: connection.call(
                "trainer", trainer.ListRuns, trainer_pb2.ListRunsRequest(page_token=LONG)
            ),
            invalid,
        ),
        "watch cursor": (
            lambda: list(
                connection.stream(
                    "trainer",
                    trainer.WatchRun,
                    trainer_pb2.WatchRunRequest(run_id=LONG, after_event_id=LONG),
                )
            ),
            invalid,
        ),
        "Hub repo": (export(format="adapter", hub_repo=LONG), config),
        "training method": (train(method=LONG), config),
        "adapter kind": (train(adapter=LONG), config),
        "tracker": (train(report_to=[LONG]), config),
        "campaign merge": (
            lambda: connection.call("trainer", trainer.SubmitMultiRun, campaign),
            config,
        ),
        "export format": (export(format=LONG), config),
        "quantisation": (export(quantization=LONG), config),
        "download key": (
            lambda: list(connection.stream("export", connection.export.DownloadArtifact, download)),
            "INPUT_ARTIFACT_NOT_DOWNLOADABLE",
        ),
        "dataset format": (upload_with(format=LONG), "INPUT_DATASET_FORMAT_UNKNOWN"),
        "dedup mode": (upload_with(dedup=LONG), config),
        "language": (upload_with(languages=[LONG]), config),
    }


def test_a_field_far_too_long_is_refused_with_its_code_in_an_answer_that_fits(
    stack: Stack,
) -> None:
    """gRPC refuses trailers over 8 KiB whole: a refusal that echoed the field would arrive as
    RESOURCE_EXHAUSTED, not as itself."""
    answers, expected, sizes = {}, {}, {}
    for name, (call, code) in long_fields(stack).items():
        expected[name] = code
        try:
            call()
            answers[name] = "(answered)"
        except BackpropagateError as refused:
            answers[name] = refused.code
            sizes[name] = len(refused.message)
        except Exception as raw:  # what gRPC gives when the trailers overflow
            answers[name] = f"{type(raw).__name__}: {str(raw)[:80]}"

    assert answers == expected
    assert {name: size for name, size in sizes.items() if size > MAX_MESSAGE_CHARS} == {}
