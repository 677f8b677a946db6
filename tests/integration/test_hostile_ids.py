"""Path-like and malformed ids get one answer from every service, whatever the store.

A real `backprop serve all` process runs once over the S3 store (moto) and once over the local
directory store; every request that names a run, an export or a dataset is sent with ids that
would name a path (`../../etc/passwd`, `/etc/passwd`) or are no ids at all. Each is answered
NOT_FOUND with the stable code before any store is asked, and nothing is created.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import servers
from service_processes import serve, stack_env

from backpropagate.connection import Connection
from backpropagate.v1 import dataprep_pb2, export_pb2, trainer_pb2
from backpropagate_services.common.errors import BackpropagateError
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


@pytest.fixture(scope="module", params=["s3", "local"])
def connection(
    request: pytest.FixtureRequest,
    redis_url: str,
    s3_endpoint: str,
    model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Connection]:
    home = tmp_path_factory.mktemp(f"hostile-{request.param}")
    env = stack_env(redis_url, s3_endpoint, model_cache, home, STORE__BACKEND=request.param)
    address = servers.free_address()
    with serve("all", address, env, log_path=home / "serve.log"):
        client = Connection(dict.fromkeys(SERVICES, address), embedded=False)
        try:
            yield client
        finally:
            client.close()


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
