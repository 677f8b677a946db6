"""DownloadArtifact serves what is meant to be downloaded, and nothing else a caller names.

The real export servicer runs in a real gRPC server on a loopback port over a local store that
holds a dataset, a run's record, checkpoint and loss curve, and an export; the client asks with
the same `download_artifact` the CLI uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from service_processes import connected, in_process_stack

from backpropagate.connection import Connection
from backpropagate.workflows import download_artifact
from backpropagate_api.errors import ArtifactNotDownloadableError
from backpropagate_api.layout import (
    export_file_key,
    export_record_key,
    loss_curve_key,
    run_record_key,
)
from backpropagate_api.settings import SafetySettings, Settings
from backpropagate_api.v1 import export_pb2
from backpropagate_services.common.records import save_record
from backpropagate_services.stack import RunningStack

EXPORT_ID = "export-20261206T120000-abcdef"
RUN_ID = "run-20261206T110000-123456"
GGUF_KEY = export_file_key(EXPORT_ID, "SmolLM2-run-f16.gguf")
HF_FILE_KEY = export_file_key(EXPORT_ID, "SmolLM2-run-hf/config.json")
DATASET_KEY = f"datasets/{'ab' * 32}/data.jsonl"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    settings = Settings(home=tmp_path_factory.mktemp("home"), safety=SafetySettings(source="host"))
    with in_process_stack(settings, ["export"]) as running:
        store = running.runtime.store
        store.put_bytes(DATASET_KEY, b'{"text": "somebody else\'s data"}\n')
        store.put_bytes(run_record_key(RUN_ID), b"{}")
        store.put_bytes(f"runs/{RUN_ID}/checkpoints/step-00000002-attempt-001/state.pt", b"state")
        store.put_bytes(loss_curve_key(RUN_ID), b"\x89PNG curve")
        store.put_bytes(GGUF_KEY, b"GGUF model")
        store.put_bytes(HF_FILE_KEY, b"{}")
        store.put_bytes(export_file_key(EXPORT_ID, "scratch.bin"), b"not listed")
        files = [
            export_pb2.ExportFile(name="SmolLM2-run-f16.gguf", key=GGUF_KEY),
            export_pb2.ExportFile(name="SmolLM2-run-hf/config.json", key=HF_FILE_KEY),
        ]
        result = export_pb2.ExportResult(export_id=EXPORT_ID, run_id=RUN_ID, files=files)
        save_record(store, export_record_key(EXPORT_ID), result)
        yield running


@pytest.fixture
def connection(stack: RunningStack) -> Iterator[Connection]:
    with connected(stack.address, ["export"]) as client:
        yield client


@pytest.mark.parametrize(
    ("key", "content"),
    [(GGUF_KEY, b"GGUF model"), (HF_FILE_KEY, b"{}"), (loss_curve_key(RUN_ID), b"\x89PNG curve")],
)
def test_an_exports_listed_files_and_a_runs_loss_curve_are_served(
    connection: Connection, tmp_path: Path, key: str, content: bytes
) -> None:
    assert download_artifact(connection, key, tmp_path / "out").read_bytes() == content


@pytest.mark.parametrize(
    "key",
    [
        DATASET_KEY,  # another user's raw data
        run_record_key(RUN_ID),
        f"runs/{RUN_ID}/checkpoints/step-00000002-attempt-001/state.pt",
        export_file_key(EXPORT_ID, "scratch.bin"),  # stored, but not a file of the export
        export_record_key(EXPORT_ID),
        export_file_key("export-that-never-was", "model.gguf"),
        f"exports/{EXPORT_ID}/../../{DATASET_KEY}",
        "runs/../loss.png",
        "../../etc/passwd",
        "/etc/passwd",
        "",
    ],
)
def test_any_other_key_is_refused_with_a_stable_code_whether_or_not_it_exists(
    connection: Connection, tmp_path: Path, key: str
) -> None:
    with pytest.raises(ArtifactNotDownloadableError) as refused:
        download_artifact(connection, key, tmp_path / "out")

    assert refused.value.code == "INPUT_ARTIFACT_NOT_DOWNLOADABLE"
    assert "backprop export" in refused.value.hint
    assert list(tmp_path.iterdir()) == []  # not even an empty partial download
