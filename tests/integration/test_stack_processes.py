"""The four services as separate OS processes with a real Redis and a real S3 server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import servers
from main_job import (
    check_fine_tune_learned,
    check_main_job,
    check_malformed_dataset_is_rejected,
)
from service_processes import serve, stack_env

from backpropagate import Trainer
from backpropagate_api.settings import EndpointSettings, Settings
from backpropagate_services.stack import SERVICES

pytestmark = [pytest.mark.model, pytest.mark.llama]


@pytest.fixture(scope="module")
def stack_endpoints(
    redis_url: str, s3_endpoint: str, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    addresses = {name: f"127.0.0.1:{servers.free_port()}" for name in SERVICES}
    env = stack_env(
        redis_url,
        s3_endpoint,
        model_cache,
        tmp_path_factory.mktemp("stack-home"),
        ENDPOINTS__SAFETY=addresses["safety"],
        SAFETY__INTERVAL_SECONDS="0.5",
    )
    with ExitStack() as processes:
        for name in SERVICES:
            processes.enter_context(serve(name, addresses[name], env))
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


def test_a_fine_tune_learns_and_its_record_says_how(
    remote_trainer: Trainer, tmp_path: Path
) -> None:
    check_fine_tune_learned(remote_trainer, tmp_path)
