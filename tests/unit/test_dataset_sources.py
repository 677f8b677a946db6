"""Data as users hold it besides files: a saved dataset directory, a datasets.Dataset, a Hub id.
Each becomes a Parquet file the dataprep service reads as any other table."""

from __future__ import annotations

import datasets
import pytest

from backpropagate.connection import Connection
from backpropagate.dataset_sources import check_source, dataset_file
from backpropagate.workflows import upload_dataset
from backpropagate_api.errors import ConfigError, HubUnreachableError, NotFoundError
from backpropagate_api.settings import Settings
from backpropagate_services.dataprep.formats import parse_records
from backpropagate_services.dataprep.records import file_records
from backpropagate_services.stack import start_stack

MESSAGES = [
    [{"role": "user", "content": f"Q{n}"}, {"role": "assistant", "content": f"A{n}"}]
    for n in range(3)
]
ALPACA = {"instruction": ["Say hi", "Count"], "output": ["Hi!", "1 2 3"]}


def conversations(data) -> list[list[dict[str, str]]]:
    with dataset_file(data) as path:
        return parse_records(file_records(path, path.name), path.name).conversations


def test_a_saved_dataset_directory_reads_as_its_rows(tmp_path):
    datasets.Dataset.from_dict({"messages": MESSAGES}).save_to_disk(str(tmp_path / "saved"))

    assert conversations(tmp_path / "saved") == MESSAGES


def test_a_dataset_object_and_a_dataset_dicts_train_split_read_as_their_rows():
    alpaca = datasets.Dataset.from_dict(ALPACA)
    split = datasets.DatasetDict({"train": alpaca, "test": alpaca.select([0])})

    assert conversations(alpaca)[1] == [
        {"role": "user", "content": "Count"},
        {"role": "assistant", "content": "1 2 3"},
    ]
    assert conversations(split) == conversations(alpaca)


def test_a_dataset_dict_without_a_train_split_names_its_splits():
    only_test = datasets.DatasetDict({"test": datasets.Dataset.from_dict(ALPACA)})

    with pytest.raises(ConfigError, match="has the splits test, and no 'train' split"):
        conversations(only_test)


def test_a_hub_id_offline_is_a_hub_unreachable_error_with_a_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    with pytest.raises(HubUnreachableError) as caught:
        conversations("someone/some-dataset")

    assert caught.value.code == "HUB_UNREACHABLE"
    assert caught.value.context == {"dataset": "someone/some-dataset"}
    assert "save the dataset to a file" in caught.value.hint


@pytest.mark.parametrize("typo", ["data/train.jsonl", "missing.csv", "nothing_here"])
def test_a_path_that_is_nothing_fails_at_once_as_not_found(typo):
    with pytest.raises(NotFoundError, match="Dataset file not found"):
        check_source(typo)


def test_something_else_is_refused_naming_what_can_be_passed():
    with pytest.raises(ConfigError, match="Cannot train on a value of type int") as caught:
        conversations(42)

    assert "datasets.Dataset" in caught.value.hint


def test_a_dataset_object_uploads_through_the_dataprep_service(tmp_path):
    stack = start_stack(Settings(home=tmp_path / "home"), ["dataprep"], "127.0.0.1:0")
    connection = Connection({"dataprep": stack.address}, False)
    try:
        with dataset_file(datasets.Dataset.from_dict({"messages": MESSAGES})) as path:
            info = upload_dataset(connection, path)
    finally:
        connection.close()
        stack.stop()

    assert (info.format, info.num_examples, info.filename) == ("openai", 3, "dataset.parquet")
