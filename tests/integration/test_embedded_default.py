"""The same main job with no servers at all: the client runs the stack in its own process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from main_job import check_main_job, check_malformed_dataset_is_rejected
from ollama_test_server import running_ollama_test_server

from backpropagate import Trainer, register_with_ollama
from backpropagate.workflows import follow_run, upload_dataset
from backpropagate_api.errors import (
    ConfigError,
    HubAuthRequiredError,
    JobCancelledError,
    OllamaRegistrationError,
    UserError,
)
from backpropagate_api.settings import Settings
from backpropagate_api.v1 import common_pb2, export_pb2, trainer_pb2

pytestmark = [pytest.mark.model, pytest.mark.llama]


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `backprop` process that works on the same home as `settings`."""
    return {
        **os.environ,
        "BACKPROPAGATE_HOME": str(settings.home),
        "BACKPROPAGATE_MODEL_CACHE": str(settings.model_cache_dir),
        **extra,
    }


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


def test_cli_export_hands_the_gguf_to_ollama_and_prints_the_record_as_json(
    embedded_trainer: Trainer, quickstart: Path, tmp_path: Path
) -> None:
    run = embedded_trainer.train(quickstart, steps=1, batch_size=1, max_length=64)
    settings = embedded_trainer.settings
    assert settings is not None
    out = tmp_path / "out"
    with running_ollama_test_server() as ollama:
        exported = subprocess.run(
            [
                str(Path(sys.executable).parent / "backprop"),
                "export",
                run.run_id,
                "--output-dir",
                str(out),
                "--ollama",
                "--ollama-name",
                "smol-test",
                "--ollama-modelfile",
                "--json",
            ],
            env=cli_env(settings, OLLAMA_HOST=ollama.url),
            capture_output=True,
            text=True,
            check=False,
        )
        assert exported.returncode == 0, exported.stderr
        record = json.loads(exported.stdout)
        gguf = Path(record["path"])

        assert record["run_id"] == run.run_id
        assert record["quantization"] == "f16"
        assert record["verification"]["top1_agreement"] >= 0.99
        assert gguf.parent == out and gguf.is_file()
        modelfile = gguf.with_suffix(".Modelfile").read_text()
        assert f"FROM ./{gguf.name}" in modelfile
        assert "<|im_start|>" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
        created = ollama.models["smol-test"]
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        assert created["files"] == {gguf.name: f"sha256:{digest}"}
        assert ollama.blobs[digest] == gguf.read_bytes()
        assert f'TEMPLATE """{created["template"]}"""' in modelfile
        assert "<|im_end|>" in created["parameters"]["stop"]
        assert created["parameters"]["num_ctx"] == 4096

    # The daemon is gone now: the SDK call says so with the documented code and what to do.
    with pytest.raises(OllamaRegistrationError) as caught:
        register_with_ollama(gguf, "smol-test", host=ollama.url)
    assert caught.value.code == "DEP_OLLAMA_REGISTRATION_FAILED"
    assert "ollama serve" in caught.value.hint


def test_hf_and_adapter_gguf_exports_download_every_file_under_names_of_their_own(
    embedded_trainer: Trainer, quickstart: Path, tmp_path: Path
) -> None:
    run = embedded_trainer.train(quickstart, steps=1, batch_size=1, max_length=64)

    merged = embedded_trainer.export("hf", run_id=run.run_id, output_dir=tmp_path)
    adapter = embedded_trainer.export(
        "adapter-gguf", run_id=run.run_id, quantization="f16", output_dir=tmp_path
    )

    assert merged.path == tmp_path / f"SmolLM2-135M-Instruct-{run.run_id}-hf"
    assert {"config.json", "model.safetensors"} <= {path.name for path in merged.path.iterdir()}
    assert merged.size_bytes == sum(path.stat().st_size for path in merged.files)
    assert [path.name for path in adapter.files] == [
        f"SmolLM2-135M-Instruct-{run.run_id}-adapter.gguf",
        "SmolLM2-135M-Instruct-base-f16.gguf",
    ]
    assert all(path.read_bytes()[:4] == b"GGUF" for path in adapter.files)
    assert adapter.top1_agreement >= 0.99
    assert sorted(tmp_path.iterdir()) == sorted([merged.path, *adapter.files])

    # trainer.save: the adapter, or the merged model, as a directory peft / transformers load.
    from peft import PeftConfig
    from transformers import AutoConfig

    saved = embedded_trainer.save(tmp_path / "saved" / "my-model", run_id=run.run_id)
    merged_dir = embedded_trainer.save(tmp_path / "merged", run_id=run.run_id, merged=True)
    assert PeftConfig.from_pretrained(saved).r == 16
    assert (saved / "adapter_model.safetensors").is_file()
    assert AutoConfig.from_pretrained(merged_dir).model_type == "llama"
    assert (merged_dir / "model.safetensors").is_file()
    assert not [p for p in (tmp_path / "saved").iterdir() if p.name != "my-model"]
    with pytest.raises(UserError, match="already exists"):
        embedded_trainer.save(saved, run_id=run.run_id)


def test_cancel_stops_a_running_export_mid_stage_and_a_queued_one_never_starts(
    embedded_trainer: Trainer, quickstart: Path
) -> None:
    run = embedded_trainer.train(quickstart, steps=1, batch_size=1, max_length=64)
    connection, stub = embedded_trainer.connection, embedded_trainer.connection.export

    def submit() -> str:
        request = export_pb2.SubmitExportRequest(run_id=run.run_id, quantization="q8_0")
        return connection.call("export", stub.SubmitExport, request).export_id

    running, queued = submit(), submit()  # one export worker: the second one waits
    stages = []
    for event in connection.stream(
        "export", stub.WatchExport, export_pb2.WatchExportRequest(export_id=running)
    ):
        stages.append(event.stage)
        if event.stage == "convert":  # a child process is converting now
            for export_id in (queued, running):
                connection.call(
                    "export", stub.CancelExport, export_pb2.CancelExportRequest(export_id=export_id)
                )
    records = {
        export_id: connection.call(
            "export", stub.GetExport, export_pb2.GetExportRequest(export_id=export_id)
        )
        for export_id in (running, queued)
    }

    assert "verify" not in stages and "smoke" not in stages
    assert records[running].status == common_pb2.JOB_STATUS_CANCELLED
    assert records[queued].status == common_pb2.JOB_STATUS_CANCELLED
    assert not records[running].files and not records[queued].files
    with pytest.raises(UserError, match="already ended"):
        connection.call(
            "export", stub.CancelExport, export_pb2.CancelExportRequest(export_id=running)
        )


def test_chat_with_a_run_exports_it_once_and_answers_from_that_file(
    embedded_trainer: Trainer, quickstart: Path
) -> None:
    run = embedded_trainer.train(quickstart, steps=1, batch_size=1, max_length=64)
    settings = embedded_trainer.settings
    assert settings is not None
    env = cli_env(settings)
    backprop = str(Path(sys.executable).parent / "backprop")

    def chat(question: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [backprop, "chat", run.run_id, question, "--max-tokens", "48"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    first, second = chat("Name a colour."), chat("Say hello.")

    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.strip() and second.stdout.strip()
    assert "exporting run" in first.stderr and "exporting run" not in second.stderr
    assert len(list((settings.home / "exports").glob(f"*-{run.run_id}-f16.gguf"))) == 1


def test_a_local_adapter_directory_is_imported_as_a_run_and_exports_like_one(
    embedded_trainer: Trainer, quickstart: Path, tmp_path: Path
) -> None:
    run = embedded_trainer.train(quickstart, steps=1, batch_size=1, max_length=64)
    settings = embedded_trainer.settings
    assert settings is not None
    stored = settings.local_store_root / "runs" / run.run_id / "adapter"
    adapter = tmp_path / "my-lora"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(stored / name, adapter / name)

    exported = embedded_trainer.export(run_id=str(adapter), output_dir=tmp_path / "out")

    assert exported.run_id != run.run_id
    connection = embedded_trainer.connection
    imported = connection.call(
        "trainer", connection.trainer.GetRun, trainer_pb2.GetRunRequest(run_id=exported.run_id)
    )
    assert imported.status == common_pb2.JOB_STATUS_SUCCEEDED
    assert imported.dataset_id == ""
    assert exported.top1_agreement >= 0.99 and exported.path.is_file()
    with pytest.raises(UserError, match="no peft adapter"):
        embedded_trainer.export(run_id=str(tmp_path / "out"))


def test_push_without_a_hub_token_fails_with_its_code_through_the_export_service(
    embedded_trainer: Trainer, quickstart: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = embedded_trainer.train(quickstart, steps=1, batch_size=1, max_length=64)
    monkeypatch.setenv("HF_TOKEN", "")

    with pytest.raises(HubAuthRequiredError) as caught:
        embedded_trainer.push("me/smollm2-quickstart", run_id=run.run_id)

    assert caught.value.code == "HUB_AUTH_REQUIRED"
    assert "huggingface-cli login" in caught.value.hint
    with pytest.raises(ConfigError, match="INPUT_CONFIG_INVALID"):
        embedded_trainer.push("not a repo", run_id=run.run_id)
