"""Prepared datasets in the artifact store, addressed by the sha256 of the uploaded bytes.

Dataprep writes them and the trainer reads them: this module is that contract.

Layout: datasets/<sha256>/data.jsonl (one {"messages": [...]} per line) and info.json, written
last so a reader that finds info.json always finds the complete data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from backpropagate_services.common.errors import NotFoundError
from backpropagate_services.common.store import ArtifactStore

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class DatasetRecord:
    dataset_id: str
    format: str
    num_examples: int
    num_turns: int
    size_bytes: int
    filename: str
    preview: Conversation


def _prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}"


def save_dataset(
    store: ArtifactStore,
    dataset_id: str,
    source_format: str,
    conversations: list[Conversation],
    filename: str,
    size_bytes: int,
) -> DatasetRecord:
    record = DatasetRecord(
        dataset_id=dataset_id,
        format=source_format,
        num_examples=len(conversations),
        num_turns=sum(len(c) for c in conversations),
        size_bytes=size_bytes,
        filename=filename,
        preview=conversations[0],
    )
    lines = (json.dumps({"messages": c}, ensure_ascii=False) for c in conversations)
    store.put_bytes(f"{_prefix(dataset_id)}/data.jsonl", ("\n".join(lines) + "\n").encode())
    store.put_json(f"{_prefix(dataset_id)}/info.json", asdict(record))
    return record


def load_record(store: ArtifactStore, dataset_id: str) -> DatasetRecord:
    key = f"{_prefix(dataset_id)}/info.json"
    if not dataset_id or not store.exists(key):
        raise NotFoundError(
            f"No dataset with id {dataset_id!r}.",
            hint="Upload it first (`backprop train --data FILE` does it for you).",
            dataset_id=dataset_id,
        )
    return DatasetRecord(**store.get_json(key))


def load_conversations(store: ArtifactStore, dataset_id: str) -> list[Conversation]:
    load_record(store, dataset_id)  # only complete datasets are readable
    text = store.get_bytes(f"{_prefix(dataset_id)}/data.jsonl").decode()
    return [json.loads(line)["messages"] for line in text.splitlines() if line.strip()]
