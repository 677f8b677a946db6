"""Drill: llama.cpp segfaults during an export; that export fails with RUNTIME_NATIVE_CRASH and
the export service process goes on serving the next one.

The crash is real: the drill setting BACKPROPAGATE_FAULT__NATIVE_CRASH_STAGE=quantize makes the
quantize stage's child process dereference a NULL pointer in native code (SIGSEGV).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import servers
from service_processes import serve, serving, stack_env

from backpropagate import Trainer
from backpropagate_api.errors import NativeCrashError
from backpropagate_api.grpc_errors import detail_to_error
from backpropagate_api.settings import EndpointSettings, Settings
from backpropagate_api.v1 import common_pb2, export_pb2

pytestmark = [pytest.mark.model, pytest.mark.llama]


def test_a_native_crash_fails_one_export_and_the_service_serves_the_next(
    redis_url: str, s3_endpoint: str, model_cache: Path, quickstart: Path, tmp_path: Path
) -> None:
    env = stack_env(
        redis_url,
        s3_endpoint,
        model_cache,
        tmp_path / "home",
        FAULT__NATIVE_CRASH_STAGE="quantize",
    )
    services = ("dataprep", "trainer", "export")
    addresses = {name: f"127.0.0.1:{servers.free_port()}" for name in services}
    trainer = Trainer(settings=Settings(endpoints=EndpointSettings(**addresses)), progress=False)
    with (
        serve("dataprep", addresses["dataprep"], env),
        serve("trainer", addresses["trainer"], env),
        serve("export", addresses["export"], env) as export_process,
    ):
        run = trainer.train(quickstart, steps=1, batch_size=1, max_length=64)
        crashed = export_and_wait(trainer, run.run_id, "q8_0")

        assert export_process.poll() is None, "the export service died with its child"
        assert serving(addresses["export"])
        # f16 has no quantize stage: verify and smoke run in their own children and succeed.
        exported = trainer.export("gguf", quantization="f16", output_dir=tmp_path / "out")

    assert crashed.status == common_pb2.JOB_STATUS_FAILED
    error = detail_to_error(crashed.error)
    assert isinstance(error, NativeCrashError)
    assert error.context == {"stage": "quantize", "signal": "SIGSEGV"}
    assert not crashed.artifact_key and not crashed.sha256
    assert exported.path.read_bytes()[:4] == b"GGUF"
    assert exported.quantization == "f16"
    assert exported.top1_agreement > 0.99
    assert exported.smoke_answer.strip()


def export_and_wait(trainer: Trainer, run_id: str, quantization: str) -> export_pb2.ExportResult:
    """Submit an export, follow its events to the end, and return its stored record."""
    connection, stub = trainer.connection, trainer.connection.export
    request = export_pb2.SubmitExportRequest(
        run_id=run_id, format="gguf", quantization=quantization
    )
    export_id = connection.call("export", stub.SubmitExport, request).export_id
    watch = export_pb2.WatchExportRequest(export_id=export_id)
    for _ in connection.stream("export", stub.WatchExport, watch):
        pass
    return connection.call(
        "export", stub.GetExport, export_pb2.GetExportRequest(export_id=export_id)
    )
