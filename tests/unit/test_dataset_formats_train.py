"""Every shipped dataset, whatever its kind and format, trains through the services over
gRPC: uploaded to dataprep, stored normalised, trained on by the trainer (one step each).
preference.jsonl does so with DPO in test_preference.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backpropagate.connection import Connection
from backpropagate.dataset_sources import dataset_file
from backpropagate.workflows import follow_run, submit_train, upload_dataset
from backpropagate_api.settings import Settings
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.models import OFFLINE_DEFAULT_ALIAS
from backpropagate_services.stack import RunningStack, start_stack

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SERVICES = ("dataprep", "trainer", "safety")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[RunningStack]:
    settings = Settings(home=tmp_path_factory.mktemp("formats-home"), model_cache=model_cache)
    running = start_stack(settings, list(SERVICES), "127.0.0.1:0")
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.model
@pytest.mark.parametrize(
    ("name", "source_format", "method"),
    [
        ("quickstart.jsonl", "sharegpt", "sft"),
        ("chatml.jsonl", "chatml", "sft"),
        ("prompt_response.csv", "alpaca", "sft"),
        ("alpaca.tsv", "alpaca", "sft"),
        ("messages.parquet", "openai", "sft"),
        ("stories.txt", "text", "sft"),  # completion: a document a line
        ("documents.jsonl", "text", "sft"),
        ("saved_dataset", "openai", "sft"),  # a directory datasets.save_to_disk wrote
        ("kto.jsonl", "kto", "kto"),
    ],
)
def test_each_shipped_dataset_trains_through_the_services(
    stack: RunningStack, name: str, source_format: str, method: str
) -> None:
    connection = Connection(dict.fromkeys(SERVICES, stack.address), False)
    try:
        with dataset_file(EXAMPLES / name) as path:  # a saved dataset: as a Parquet file
            dataset = upload_dataset(connection, path)
        config = trainer_pb2.TrainConfig(
            base_model=OFFLINE_DEFAULT_ALIAS, method=method, steps=1, batch_size=2, max_length=64
        )
        run_id = submit_train(connection, dataset.dataset_id, config)
        follow_run(connection, run_id)
        record = connection.call(
            "trainer", connection.trainer.GetRun, trainer_pb2.GetRunRequest(run_id=run_id)
        )
    finally:
        connection.close()

    assert (dataset.format, list(dataset.rejections)) == (source_format, [])
    assert record.status == common_pb2.JOB_STATUS_SUCCEEDED, record.error
    assert record.dataset_id == dataset.dataset_id
    assert record.examples_trained + record.examples_dropped == dataset.num_examples
    assert len(record.loss_history) == 1
