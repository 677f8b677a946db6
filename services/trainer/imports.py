"""Adapters trained elsewhere, taken in as finished runs.

A user may bring a peft adapter directory (`trainer.save(...)`, another tool, a colleague) and
want what a run gives: a verified export, a chat, a push. Importing stores the directory under
a new run, like the trainer's own output, with a record marked succeeded, so every later step
takes a run id and nothing else needs a second code path. The base model comes from the
request or from the adapter's own config, and must resolve here, now: an export that fails
minutes later because the base is missing helps nobody.

What arrives is checked before it is kept: every file path names a file inside the directory
(never `.`, a NUL, a name longer than a filesystem takes, or a file where another path has a
directory), and the config is an object whose ranks are within what training allows, since
peft builds every adapted layer at its configured rank before it loads a single weight.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from backpropagate_api.errors import QUOTED_CHARS, ConfigError, UserError, quoted
from backpropagate_api.ids import new_id
from backpropagate_api.layout import adapter_prefix
from backpropagate_api.local_names import stays_inside
from backpropagate_api.training import MAX_RANK
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.models import ModelSource, resolve_model
from backpropagate_services.common.store.base import ArtifactStore

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# A rank-256 all-linear adapter of a 7B model in fp32 is about 1.3 GB.
MAX_ADAPTER_BYTES = 8 * 2**30
# A name of 255 bytes is what Linux filesystems take; a path of 4096 bytes, of which the
# temporary directory the files land in takes some.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 1024
# peft writes a few hundred bytes, a rank_pattern for every layer of a large model some 100 KB.
MAX_CONFIG_BYTES = 2**20
CONFIG_FILE = "adapter_config.json"


def _safe_relative(path: str) -> PurePosixPath:
    """A relative path of file names that stays inside the adapter directory, or UserError."""
    if (
        not stays_inside(path)
        or len(path.encode()) > MAX_PATH_BYTES
        or any(len(name.encode()) > MAX_NAME_BYTES for name in path.split("/"))
    ):
        raise UserError(
            f"Refused adapter file path {quoted(path)}: it must be relative, stay inside the "
            f"adapter directory and name a file by names of at most {MAX_NAME_BYTES} bytes "
            "(no '.', '..', empty names, NUL, '\\' or ':').",
            path=path[:200],
        )
    return PurePosixPath(path)


def _check_not_both(dest: Path, relative: PurePosixPath) -> None:
    """UserError if `relative` names a directory received as a file, or a file as one."""
    if (dest / relative).is_dir() or any((dest / parent).is_file() for parent in relative.parents):
        raise UserError(
            f"Refused adapter file path {quoted(str(relative))}: the adapter names it, or a "
            "directory above it, both a file and a directory.",
            path=str(relative)[:200],
        )


def receive_adapter_files(
    chunks: Iterable[trainer_pb2.AdapterFileChunk], dest: Path, max_bytes: int = MAX_ADAPTER_BYTES
) -> Path:
    """Write the streamed files under `dest`; UserError for an unsafe path or too many bytes."""
    received = 0
    for chunk in chunks:
        relative = _safe_relative(chunk.path)
        _check_not_both(dest, relative)
        target = dest / relative
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
    config_file = adapter_dir / CONFIG_FILE
    if not config_file.is_file() or not any(
        (adapter_dir / name).is_file() for name in WEIGHT_FILES
    ):
        raise UserError(
            f"{adapter_dir.name} is no peft adapter directory: it needs {CONFIG_FILE} and "
            f"{' or '.join(WEIGHT_FILES)}.",
            hint="Point at the directory `trainer.save()` or peft's save_pretrained wrote.",
        )
    config = _adapter_config(config_file)
    base = requested or str(config.get("base_model_name_or_path") or "")
    if not base:
        raise ConfigError(
            "The adapter does not say which base model it was trained on.",
            hint="Name it: backprop export DIR --model <HF id, local dir or .gguf>.",
        )
    return base


def _adapter_config(config_file: Path) -> dict[str, object]:
    """The adapter's config, once it is a JSON object of ranks peft can build in bounds."""
    if config_file.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES // 1024} KiB.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"{CONFIG_FILE} is not a JSON object.")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise UserError(f"{CONFIG_FILE}'s rank_pattern is not an object of layer ranks.")
    ranks = [("r", config["r"])] if "r" in config else []  # absent: peft's default
    ranks += [(f"rank_pattern[{quoted(layer)}]", rank) for layer, rank in pattern.items()]
    for name, rank in ranks:
        if type(rank) is not int or not 1 <= rank <= MAX_RANK:
            raise UserError(
                f"{CONFIG_FILE} gives {name} = {json.dumps(rank)[:QUOTED_CHARS]}: a LoRA rank "
                f"is an integer in [1, {MAX_RANK}].",
                hint="peft builds every adapted layer at its rank before loading the weights: "
                "import an adapter trained at a rank training allows.",
                fields=name[:200],
            )
    return config


def import_adapter(
    store: ArtifactStore,
    adapter_dir: Path,
    requested_base: str,
    resolve: Callable[[str], ModelSource] = resolve_model,
) -> trainer_pb2.RunRecord:
    """Store `adapter_dir` as a new succeeded run; the base must resolve on this machine through
    `resolve`, which also refuses what the caller may not name (`resolve_model_for`)."""
    source = resolve(adapter_base_model(adapter_dir, requested_base))
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
