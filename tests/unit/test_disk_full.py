"""A full disk fails a job with a clear, retryable error (RUNTIME_DISK_FULL, naming where to
free space) and leaves nothing half-written: a run keeps only its complete checkpoints, and once
space is freed, resuming it goes on from the last of them to the end.

The disk is real: a small tmpfs mounted for the test (CI runs as root, as this machine does)
holds the stack's whole home (queue file, records, artifacts), and a file that takes its free
space fills it, as another program filling the disk would. The stack is the one users run, in
this process, training a tiny random Llama (the real tokenizer).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from minio import Minio
from servers import LOOPBACK
from service_processes import connected, in_process_stack
from test_training_loop import tiny_llama

from backpropagate.connection import Connection
from backpropagate.workflows import (
    export,
    follow_run,
    resume_run,
    submit_train,
    upload_dataset,
)
from backpropagate_api.errors import BackpropagateError
from backpropagate_api.grpc_errors import as_backpropagate_error
from backpropagate_api.layout import adapter_prefix, checkpoints_prefix
from backpropagate_api.settings import SafetySettings, Settings
from backpropagate_api.v1 import common_pb2, export_pb2, trainer_pb2
from backpropagate_services.common.atomic import PARTIAL_SUFFIX
from backpropagate_services.common.records import from_json
from backpropagate_services.common.store.base import MANIFEST
from backpropagate_services.common.store.local import LocalDirStore
from backpropagate_services.common.store.s3 import S3Store
from backpropagate_services.stack import SERVICES
from backpropagate_services.trainer.loop.checkpoints import (
    INFO_FILE,
    STATE_FILE,
    CheckpointManager,
    CheckpointPolicy,
    TrainingState,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DISK_BYTES = 64 * 1024 * 1024
CHECKPOINT_EVERY = 2
STEPS = 3 * CHECKPOINT_EVERY
# A high rank makes a checkpoint (adapter and Adam's two moments) a few MB: large against all
# else a run writes between two checkpoints (records, the queue's pages), so the free space left
# decides which checkpoint fits.
LORA_R = 256


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A filesystem of its own, DISK_BYTES large, unmounted at the end."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    size = f"size={DISK_BYTES}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", size, "bp-test", mount_point], check=True)
    try:
        # fill() takes all the free space it sees: never the real disk's.
        assert shutil.disk_usage(mount_point).total == DISK_BYTES, "no tmpfs mounted there"
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", mount_point], check=True)  # a handle may be open


@pytest.fixture
def tiny_model(smollm2_tokenizer, tmp_path: Path) -> Path:
    """A tiny random Llama as a local HF directory (off the small disk, as a model cache is)."""
    directory = tmp_path / "tiny-llama"
    tiny_llama(smollm2_tokenizer).save_pretrained(directory)
    smollm2_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def client(small_disk: Path, model_cache: Path) -> Iterator[Connection]:
    """A client of the whole stack, its home on the small disk."""
    settings = Settings(
        home=small_disk / "home", model_cache=model_cache, safety=SafetySettings(source="host")
    )
    with (
        in_process_stack(settings, list(SERVICES)) as stack,
        connected(stack.address, list(SERVICES)) as connection,
    ):
        yield connection


def fill(disk: Path, leave: int = 0) -> Path:
    """Take all the disk's free space but `leave` bytes; the file to delete to free it."""
    filler = disk / "filler"
    with filler.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, shutil.disk_usage(disk).free - leave)
    return filler


def train(client: Connection, model: Path, dataset_id: str, steps: int) -> str:
    """Queue a run of `steps` with a checkpoint every CHECKPOINT_EVERY; its id."""
    config = trainer_pb2.TrainConfig(
        base_model=str(model),
        steps=steps,
        batch_size=2,
        max_length=64,
        lora_r=LORA_R,
        checkpoint_every=CHECKPOINT_EVERY,
    )
    return submit_train(client, dataset_id, config)


def get_run(client: Connection, run_id: str) -> trainer_pb2.RunRecord:
    request = trainer_pb2.GetRunRequest(run_id=run_id)
    return client.call("trainer", client.trainer.GetRun, request)


def stored_checkpoints(store_root: Path, run_id: str) -> dict[str, list[str]]:
    """The run's checkpoint directories on the disk, with every file in each."""
    root = store_root / checkpoints_prefix(run_id)
    return {
        directory.name: sorted(path.name for path in directory.iterdir())
        for directory in sorted(root.iterdir())
    }


def assert_disk_full(error: BackpropagateError | common_pb2.ErrorDetail, where: Path) -> None:
    """The stable, retryable code, and a hint that names where to free space."""
    assert (error.code, error.retryable) == ("RUNTIME_DISK_FULL", True), error
    assert str(where) in error.hint
    assert "bug" not in error.hint


def test_a_full_disk_fails_the_run_as_retryable_keeps_only_whole_checkpoints_and_resume_finishes(
    client: Connection, small_disk: Path, tiny_model: Path, quickstart: Path
) -> None:
    store_root = small_disk / "home" / "artifacts"
    dataset_id = upload_dataset(client, quickstart).dataset_id
    # What one checkpoint takes, from a first run of one checkpoint.
    measured = follow_run(client, train(client, tiny_model, dataset_id, CHECKPOINT_EVERY))
    checkpoint_bytes = get_run(client, measured.run_id).checkpoints[0].size_bytes
    # Room for the next run's first checkpoint, not for its second.
    filler = fill(small_disk, leave=checkpoint_bytes * 3 // 2)
    run_id = train(client, tiny_model, dataset_id, STEPS)

    with pytest.raises(BackpropagateError) as failed:
        follow_run(client, run_id)

    assert_disk_full(failed.value, store_root)
    record = get_run(client, run_id)
    assert record.status == common_pb2.JOB_STATUS_FAILED
    assert_disk_full(record.error, store_root)
    assert [info.step for info in record.checkpoints] == [CHECKPOINT_EVERY]
    assert record.last_checkpoint_step == CHECKPOINT_EVERY
    (kept,) = record.checkpoints
    whole = sorted([MANIFEST, INFO_FILE, STATE_FILE])
    assert stored_checkpoints(store_root, run_id) == {Path(kept.key).name: whole}
    assert not [path for path in store_root.rglob("*") if path.name.endswith(PARTIAL_SUFFIX)]

    filler.unlink()
    resumed = resume_run(client, run_id)

    assert resumed.status == "succeeded"
    record = get_run(client, run_id)
    assert (record.attempts, record.resumed_from_step) == (2, CHECKPOINT_EVERY)
    assert len(record.loss_history) == STEPS
    assert STEPS in [info.step for info in record.checkpoints]


def test_a_dataset_upload_to_a_full_disk_is_refused_as_retryable_and_stores_nothing(
    client: Connection, small_disk: Path, quickstart: Path
) -> None:
    store_root = small_disk / "home" / "artifacts"
    fill(small_disk)

    with pytest.raises(BackpropagateError) as failed:
        upload_dataset(client, quickstart)

    assert_disk_full(failed.value, store_root)
    assert not [path for path in store_root.rglob("*") if path.is_file()]


def test_an_export_to_a_full_disk_fails_as_retryable_and_lists_no_file(
    client: Connection, small_disk: Path, tiny_model: Path, quickstart: Path, tmp_path: Path
) -> None:
    store_root = small_disk / "home" / "artifacts"
    dataset_id = upload_dataset(client, quickstart).dataset_id
    run_id = follow_run(client, train(client, tiny_model, dataset_id, CHECKPOINT_EVERY)).run_id
    adapter = store_root / adapter_prefix(run_id)
    adapter_bytes = sum(path.stat().st_size for path in adapter.iterdir())
    # Room for the export's record, not for its files.
    fill(small_disk, leave=adapter_bytes // 2)

    with pytest.raises(BackpropagateError) as failed:
        export(client, run_id, tmp_path / "out", export_format="adapter")

    assert_disk_full(failed.value, store_root)
    (record_file,) = (store_root / "exports").glob("*/export.json")
    record = from_json(json.loads(record_file.read_text()), export_pb2.ExportResult)
    assert record.status == common_pb2.JOB_STATUS_FAILED
    assert_disk_full(record.error, store_root)
    assert not record.files
    assert [path.name for path in record_file.parent.rglob("*")] == [record_file.name]


def test_a_checkpoint_whose_temporary_copy_meets_a_full_disk_fails_as_disk_full_naming_it(
    small_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))  # where the copy is built
    store = LocalDirStore(tmp_path / "store")
    state = TrainingState(
        step=1,
        loss_history=[1.0],
        tokens_seen=1,
        micro_batch_size=1,
        adapter={"lora_A": torch.zeros(1024 * 1024)},
        optimizer={},
        scheduler={},
        data_order={},
        torch_rng=torch.get_rng_state(),
        cuda_rng=[],
    )
    fill(small_disk, leave=64 * 1024)

    with pytest.raises(BackpropagateError) as failed:
        CheckpointManager(store, "run-1", CheckpointPolicy()).save(state, attempt=1)

    assert_disk_full(failed.value, small_disk)
    assert store.list("") == []


def test_a_native_writer_meeting_a_full_disk_is_reported_as_disk_full_not_as_a_bug(
    small_disk: Path,
) -> None:
    from safetensors.torch import save_file

    fill(small_disk)
    with pytest.raises(Exception) as raised:  # safetensors' own class, not an OSError
        save_file({"lora_A": torch.zeros(1024 * 1024)}, small_disk / "adapter.safetensors")

    error = as_backpropagate_error(raised.value)

    assert (error.code, error.retryable) == ("RUNTIME_DISK_FULL", True)
    assert "No space left on device" in error.message


class StorageFullMinio(BaseHTTPRequestHandler):
    """Answers as a MinIO whose drives reached their free-space threshold does: every bucket
    exists, every write is refused with HTTP 507 and the code XMinioStorageFull."""

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = (
            '<?xml version="1.0" encoding="UTF-8"?><Error><Code>XMinioStorageFull</Code>'
            "<Message>Storage backend has reached its minimum free drive threshold. Please "
            "delete a few objects to proceed.</Message><Resource>"
            f"{self.path}</Resource><RequestId>1</RequestId><HostId>minio</HostId></Error>"
        ).encode()
        self.send_response(507)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Quiet: the test reads the client's error, not the server's log."""


def test_minio_refusing_a_write_for_want_of_space_is_disk_full_naming_the_bucket() -> None:
    server = ThreadingHTTPServer((LOOPBACK, 0), StorageFullMinio)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = Minio(
            f"{LOOPBACK}:{server.server_port}",
            access_key="test",
            secret_key="test",
            secure=False,
            region="us-east-1",
        )
        store = S3Store(client, "backpropagate")

        with pytest.raises(BackpropagateError) as failed:
            store.put_bytes("runs/run-1/run.json", b"{}")
    finally:
        server.shutdown()
        thread.join()

    error = failed.value
    assert (error.code, error.retryable) == ("RUNTIME_DISK_FULL", True)
    assert "'backpropagate'" in error.hint
    assert "minimum free drive threshold" in error.message
