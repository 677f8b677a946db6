"""The same main job with no servers at all: the client runs the stack in its own process."""

from __future__ import annotations

from pathlib import Path

import pytest
from main_job import check_main_job, check_malformed_dataset_is_rejected

from backpropagate import Trainer
from backpropagate.v1 import common_pb2, trainer_pb2
from backpropagate.workflows import follow_run, upload_dataset
from backpropagate_services.common.errors import JobCancelledError, UserError
from backpropagate_services.common.settings import Settings

pytestmark = [pytest.mark.model, pytest.mark.llama]


@pytest.fixture(scope="module")
def embedded_trainer(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    settings = Settings(home=tmp_path_factory.mktemp("embedded-home"), model_cache=model_cache)
    trainer = Trainer(settings=settings, progress=False)
    assert trainer.connection.embedded
    return trainer


def test_main_job_through_the_embedded_default(
    embedded_trainer: Trainer, quickstart: Path, tmp_path: Path
) -> None:
    check_main_job(embedded_trainer, quickstart, tmp_path / "out")


def test_malformed_dataset_error_in_embedded_mode(
    embedded_trainer: Trainer, tmp_path: Path
) -> None:
    check_malformed_dataset_is_rejected(embedded_trainer, tmp_path)


def test_cancel_stops_a_running_run_and_a_queued_one_never_starts(
    embedded_trainer: Trainer, quickstart: Path
) -> None:
    connection = embedded_trainer.connection
    dataset = upload_dataset(connection, quickstart)

    def submit(steps: int) -> str:
        request = trainer_pb2.SubmitTrainRequest(
            dataset_id=dataset.dataset_id,
            config=trainer_pb2.TrainConfig(steps=steps, batch_size=1, max_length=64),
        )
        return connection.call("trainer", connection.trainer.SubmitTrain, request).run_id

    running, queued = submit(500), submit(500)  # one train worker: the second one waits
    watch = trainer_pb2.WatchRunRequest(run_id=running)
    for event in connection.stream("trainer", connection.trainer.WatchRun, watch):
        if event.step >= 1:
            break
    for run_id in (queued, running):
        connection.call(
            "trainer", connection.trainer.CancelRun, trainer_pb2.CancelRunRequest(run_id=run_id)
        )
    for run_id in (running, queued):
        with pytest.raises(JobCancelledError):
            follow_run(connection, run_id)
    records = {
        run_id: connection.call(
            "trainer", connection.trainer.GetRun, trainer_pb2.GetRunRequest(run_id=run_id)
        )
        for run_id in (running, queued)
    }
    assert records[running].status == common_pb2.JOB_STATUS_CANCELLED
    assert 1 <= len(records[running].loss_history) < 500
    assert records[queued].status == common_pb2.JOB_STATUS_CANCELLED
    assert len(records[queued].loss_history) == 0
    with pytest.raises(UserError, match="already ended"):
        connection.call(
            "trainer", connection.trainer.CancelRun, trainer_pb2.CancelRunRequest(run_id=running)
        )
