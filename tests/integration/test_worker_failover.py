"""A trainer process killed mid-run loses no job: another trainer picks the run up and ends it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import servers
from service_processes import serve, stack_env

from backpropagate.connection import Connection
from backpropagate.v1 import common_pb2, trainer_pb2
from backpropagate.workflows import follow_run, upload_dataset
from backpropagate_services.common.settings import EndpointSettings, Settings
from backpropagate_services.trainer.worker import STARTED_MESSAGE

pytestmark = [pytest.mark.model]

VISIBILITY_TIMEOUT_SECONDS = "3"


def test_run_of_a_killed_trainer_is_finished_by_another_trainer(
    redis_url: str,
    s3_endpoint: str,
    model_cache: Path,
    quickstart: Path,
    tmp_path: Path,
) -> None:
    env = stack_env(
        redis_url,
        s3_endpoint,
        model_cache,
        tmp_path / "home",
        QUEUE__VISIBILITY_TIMEOUT_SECONDS=VISIBILITY_TIMEOUT_SECONDS,
    )
    dataprep, trainer = (f"127.0.0.1:{servers.free_port()}" for _ in range(2))
    connection = Connection.open(
        Settings(endpoints=EndpointSettings(dataprep=dataprep, trainer=trainer))
    )
    with serve("dataprep", dataprep, env):
        dataset = upload_dataset(connection, quickstart)
        with serve("trainer", trainer, env) as first_trainer:
            submitted = connection.call(
                "trainer",
                connection.trainer.SubmitTrain,
                trainer_pb2.SubmitTrainRequest(
                    dataset_id=dataset.dataset_id,
                    config=trainer_pb2.TrainConfig(steps=6, batch_size=2, max_length=128),
                ),
            )
            request = trainer_pb2.WatchRunRequest(run_id=submitted.run_id)
            for event in connection.stream("trainer", connection.trainer.WatchRun, request):
                if event.step >= 1 and event.loss > 0:
                    break  # the first worker is mid-run
            first_trainer.send_signal(signal.SIGKILL)
            first_trainer.wait()

        events: list[trainer_pb2.RunEvent] = []
        with serve("trainer", trainer, env):
            run = follow_run(connection, submitted.run_id, events.append)
    assert run.status == "succeeded"
    assert len(run.loss_history) == 6
    assert run.output.startswith(f"runs/{submitted.run_id}/adapter")
    starts = [event for event in events if event.message == STARTED_MESSAGE]
    assert len(starts) == 2, "the job was not redelivered to a second worker"
    assert all(event.status == common_pb2.JOB_STATUS_RUNNING for event in starts)
