"""The main job, checked the same way whichever deployment runs it.

Upload examples/quickstart.jsonl, train 3 steps on the real SmolLM2, export a GGUF, download it,
and have llama.cpp answer a prompt with the downloaded file; then send a malformed dataset and
expect its error code and line number back.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest

from backpropagate import Trainer
from backpropagate.results import ExportResult
from backpropagate.workflows import download_artifact, follow_run
from backpropagate_api.errors import (
    DatasetSchemaError,
    DatasetValidationError,
    ExportVerificationError,
    GpuNotAvailableError,
)
from backpropagate_api.layout import loss_curve_key
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.export.smoke import smoke_answer

TRAIN_STEPS = 3


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_main_job(trainer: Trainer, quickstart: Path, out_dir: Path) -> None:
    run = trainer.train(quickstart, steps=TRAIN_STEPS, batch_size=2, max_length=256)
    assert run.status == "succeeded"
    assert run.steps == TRAIN_STEPS
    assert len(run.loss_history) == TRAIN_STEPS
    assert all(math.isfinite(loss) and loss > 0 for loss in run.loss_history)
    assert run.final_loss == pytest.approx(run.loss_history[-1])
    assert run.samples_seen == TRAIN_STEPS * 2
    assert run.output.startswith(f"runs/{run.run_id}/adapter")
    assert run.duration_seconds > 0

    events: list[trainer_pb2.RunEvent] = []
    again = follow_run(trainer.connection, run.run_id, events.append)  # replays the history
    assert again.run_id == run.run_id
    statuses = [event.status for event in events]
    assert statuses[0] == common_pb2.JOB_STATUS_QUEUED
    assert statuses[-1] == common_pb2.JOB_STATUS_SUCCEEDED
    steps = [event for event in events if event.loss > 0]
    assert [event.step for event in steps] == list(range(1, TRAIN_STEPS + 1))
    assert all(event.tokens_per_second > 0 for event in steps)
    assert any(event.safety_level != common_pb2.SAFETY_LEVEL_UNSPECIFIED for event in events)

    curve = download_artifact(trainer.connection, loss_curve_key(run.run_id), out_dir / "l.png")
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    exported = trainer.export("gguf", output_dir=out_dir)
    assert exported.path.is_file()
    assert exported.path.parent == out_dir
    assert exported.path.stat().st_size == exported.size_bytes
    assert exported.path.read_bytes()[:4] == b"GGUF"
    assert stat.S_IMODE(exported.path.stat().st_mode) == 0o666 & ~current_umask()
    assert exported.smoke_answer.strip()
    assert exported.path.name == f"SmolLM2-135M-Instruct-{run.run_id}-f16.gguf"
    reply = smoke_answer(exported.path, "Name one colour of the sky.", threads=1)
    assert reply.text.strip()
    assert reply.finish_reason == "stop"
    check_interrupted_download_resumes(trainer, exported, out_dir / "again")


def check_interrupted_download_resumes(
    trainer: Trainer, exported: ExportResult, dest: Path
) -> None:
    """A partial download is completed from where it stopped; a corrupt one is thrown away."""
    whole = exported.path.read_bytes()
    target = dest / exported.path.name
    partial = dest / f".{target.name}.download"
    dest.mkdir()
    partial.write_bytes(whole[: len(whole) // 3])

    download_artifact(trainer.connection, exported.artifact_key, target, exported.sha256)

    assert target.read_bytes() == whole
    assert not partial.exists()

    target.unlink()
    partial.write_bytes(b"not the start of that file")
    with pytest.raises(ExportVerificationError):
        download_artifact(trainer.connection, exported.artifact_key, target, exported.sha256)
    assert not partial.exists() and not target.exists()


CODE_WORDS = {"0": "apple", "1": "river", "2": "stone", "3": "cloud"}


def check_fine_tune_learned(trainer: Trainer, tmp_path: Path) -> None:
    """A memorisation set trained with an eval set: the eval loss ends far below the base
    model's, and the record tells where and how it trained."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is code word {number}?"},
                {"role": "assistant", "content": f"Code word {number} is {word}."},
            ]
        }
        for number, word in CODE_WORDS.items()
    ]
    data = tmp_path / "codes.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")

    run = trainer.train(
        data,
        steps=8,
        learning_rate=2e-3,
        max_length=64,
        eval_data=data,
        eval_every=4,
        lora_dropout=0.0,
        adapter="dora",
    )

    assert run.status == "succeeded" and run.adapter == "dora"
    assert [step for step, _ in run.evals] == [0, 4, 8]
    base_loss = run.evals[0][1]
    assert run.best_eval_loss < base_loss / 3, run.evals
    assert run.best_eval_loss == min(loss for step, loss in run.evals if step)
    assert run.device == "cpu" and run.compute_dtype in ("bfloat16", "float32")
    assert run.trainable_parameters > 0 and run.tokens_per_second > 0
    assert run.peak_memory_bytes > 100 * 2**20
    with pytest.raises(GpuNotAvailableError) as refused:
        trainer.train(data, steps=1, adapter="qlora")
    assert refused.value.code == "DEP_GPU_NOT_AVAILABLE" and "lora" in refused.value.hint


def check_malformed_dataset_is_rejected(trainer: Trainer, tmp_path: Path) -> None:
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "no answer here"}]},
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    with pytest.raises(DatasetSchemaError) as caught:
        trainer.train(bad, steps=1, strict=True)
    assert caught.value.code == "INPUT_DATASET_SCHEMA"
    assert caught.value.context["line"] == "3"
    assert caught.value.context["filename"] == "bad.jsonl"
    assert "line 3" in caught.value.message
    # Without --strict a third of the rows bad is past the tenth left out: the list comes back.
    with pytest.raises(DatasetValidationError) as listed:
        trainer.train(bad, steps=1)
    assert listed.value.context == {"filename": "bad.jsonl", "rows_read": "3", "rows_rejected": "1"}
    assert "line 3: field 'conversations' has no assistant turn" in listed.value.message
