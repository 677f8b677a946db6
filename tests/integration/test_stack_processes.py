"""The four services as separate OS processes with a real Redis and a real S3 server."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
import servers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from main_job import check_main_job, check_malformed_dataset_is_rejected

from backpropagate import Trainer
from backpropagate_services.common.settings import EndpointSettings, Settings
from backpropagate_services.stack import SERVICES

pytestmark = [pytest.mark.model, pytest.mark.llama]


def serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


@pytest.fixture(scope="module")
def stack_endpoints(
    redis_url: str, s3_endpoint: str, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    addresses = {name: f"127.0.0.1:{servers.free_port()}" for name in SERVICES}
    env = {
        **os.environ,
        "BACKPROPAGATE_HOME": str(tmp_path_factory.mktemp("stack-home")),
        "BACKPROPAGATE_MODEL_CACHE": str(model_cache),
        "BACKPROPAGATE_QUEUE__BACKEND": "redis",
        "BACKPROPAGATE_QUEUE__REDIS_URL": redis_url,
        "BACKPROPAGATE_QUEUE__NAMESPACE": f"it-{uuid.uuid4().hex[:8]}",
        "BACKPROPAGATE_STORE__BACKEND": "s3",
        "BACKPROPAGATE_STORE__S3_ENDPOINT": s3_endpoint,
        "BACKPROPAGATE_STORE__S3_BUCKET": f"it-{uuid.uuid4().hex[:8]}",
        "BACKPROPAGATE_ENDPOINTS__SAFETY": addresses["safety"],
        "BACKPROPAGATE_SAFETY__INTERVAL_SECONDS": "0.5",
    }
    backprop = str(Path(sys.executable).parent / "backprop")
    with ExitStack() as processes:
        for name in SERVICES:
            argv = [backprop, "serve", name, "--listen", addresses[name]]
            processes.enter_context(
                servers.running(
                    argv,
                    ready=lambda address=addresses[name]: serving(address),
                    what=f"backprop serve {name}",
                    timeout=120,
                    env=env,
                )
            )
        yield addresses


@pytest.fixture(scope="module")
def remote_trainer(stack_endpoints: dict[str, str]) -> Trainer:
    settings = Settings(endpoints=EndpointSettings(**stack_endpoints))
    trainer = Trainer(settings=settings, progress=False)
    assert not trainer.connection.embedded
    return trainer


def test_main_job_through_four_service_processes(
    remote_trainer: Trainer, quickstart: Path, tmp_path: Path
) -> None:
    check_main_job(remote_trainer, quickstart, tmp_path / "out")


def test_malformed_dataset_error_crosses_grpc_with_code_and_line(
    remote_trainer: Trainer, tmp_path: Path
) -> None:
    check_malformed_dataset_is_rejected(remote_trainer, tmp_path)
