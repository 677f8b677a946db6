"""Adapters trained elsewhere, taken in as finished runs.

A user may bring a peft adapter directory (`trainer.save(...)`, another tool, a colleague) and
want what a run gives: a verified export, a chat, a push. Importing stores the directory under
a new run, like the trainer's own output, with a record marked succeeded, so every later step
takes a run id and nothing else needs a second code path. The base model comes from the
request or from the adapter's own config, and must resolve here, now: an export that fails
minutes later because the base is missing helps nobody.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from backpropagate.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.errors import ConfigError, UserError
from backpropagate_services.common.ids import new_id
from backpropagate_services.common.layout import adapter_prefix
from backpropagate_services.common.models import ModelSource, resolve_model
from backpropagate_services.common.store.base import ArtifactStore

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# A rank-256 all-linear adapter of a 7B model in fp32 is about 1.3 GB.
MAX_ADAPTER_BYTES = 8 * 2**30


def _safe_relative(path: str) -> PurePosixPath:
    """A relative path that stays inside the adapter directory, or UserError."""
    relative = PurePosixPath(path)
    if not path or relative.is_absolute() or ".." in relative.parts or "\\" in path:
        raise UserError(
            f"Refused adapter file path {path!r}: it must be relative and stay inside the "
            "adapter directory.",
            path=path,
        )
    return relative


def receive_adapter_files(
    chunks: Iterable[trainer_pb2.AdapterFileChunk], dest: Path, max_bytes: int = MAX_ADAPTER_BYTES
) -> Path:
    """Write the streamed files under `dest`; UserError for an unsafe path or too many bytes."""
    received = 0
    for chunk in chunks:
        target = dest / _safe_relative(chunk.path)
        received += len(chunk.data)
        if received > max_bytes:
            raise UserError(
                f"The adapter is larger than {max_bytes / 2**30:.0f} GiB: that is no LoRA adapter.",
                hint="Export a merged model directory with `backprop export --format hf` instead.",
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("ab") as handle:
            handle.write(chunk.data)
    return dest


def adapter_base_model(adapter_dir: Path, requested: str) -> str:
    """The base model spec: `requested`, else the adapter config's base_model_name_or_path."""
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file() or not any(
        (adapter_dir / name).is_file() for name in WEIGHT_FILES
    ):
        raise UserError(
            f"{adapter_dir.name} is no peft adapter directory: it needs adapter_config.json and "
            f"{' or '.join(WEIGHT_FILES)}.",
            hint="Point at the directory `trainer.save()` or peft's save_pretrained wrote.",
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"adapter_config.json is not valid JSON: {exc}") from None
    base = requested or str(config.get("base_model_name_or_path") or "")
    if not base:
        raise ConfigError(
            "The adapter does not say which base model it was trained on.",
            hint="Name it: backprop export DIR --model <HF id, local dir or .gguf>.",
        )
    return base


def import_adapter(
    store: ArtifactStore,
    adapter_dir: Path,
    requested_base: str,
    allowed: Callable[[ModelSource], None] = lambda _: None,
) -> trainer_pb2.RunRecord:
    """Store `adapter_dir` as a new succeeded run; the base must resolve on this machine, and
    `allowed` (which raises) must let the caller name it."""
    source = resolve_model(adapter_base_model(adapter_dir, requested_base))
    allowed(source)
    run_id = new_id("run")
    store.put_dir(adapter_prefix(run_id), adapter_dir)
    return trainer_pb2.RunRecord(
        run_id=run_id,
        status=common_pb2.JOB_STATUS_SUCCEEDED,
        base_model=source.spec,
        output=f"{adapter_prefix(run_id)}/",
        created_at=time.time(),
        config=trainer_pb2.TrainConfig(base_model=source.spec),
    )
