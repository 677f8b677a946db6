"""The embedded default keeps each home to itself: a process that opens connections on two home
directories gets a stack for each, and what it uploads through one lands under that home only."""

from __future__ import annotations

from pathlib import Path

from backpropagate.connection import Connection
from backpropagate.workflows import upload_dataset
from backpropagate_api.settings import SafetySettings, Settings


def test_two_homes_in_one_process_get_a_stack_and_a_store_each(
    tmp_path: Path, quickstart: Path
) -> None:
    homes = [tmp_path / "first", tmp_path / "second"]
    connections = [
        Connection.open(Settings(home=home, safety=SafetySettings(source="host")), workers=False)
        for home in homes
    ]
    try:
        first, second = connections
        assert first.embedded and second.embedded
        assert first.addresses["trainer"] != second.addresses["trainer"]
        uploaded = upload_dataset(second, quickstart).dataset_id
        again = Connection.open(Settings(home=homes[1]), workers=False)
        assert again.addresses == second.addresses  # one stack per home, reused
        again.close()
    finally:
        for connection in connections:
            connection.close()

    assert (homes[1] / "artifacts" / "datasets" / uploaded).is_dir()
    assert not (homes[0] / "artifacts" / "datasets").exists()
