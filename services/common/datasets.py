"""Prepared datasets in the artifact store, addressed by the uploaded bytes and the options they
were prepared with (`prepared_dataset_id`), so preparing the same thing twice finds the first.

Dataprep writes them and the trainer reads them: this module is that contract.

Layout: datasets/<sha256>/data.jsonl and info.json, written last so a reader that finds
info.json always finds the complete data. A line of data.jsonl is, by the dataset's format:
- chat (sharegpt, openai, alpaca, chatml): {"messages": [...]}, OpenAI-style messages;
- text: {"text": "..."}, one document, trained as completion (every token learnt);
- preference: {"prompt": [...], "chosen": [...], "rejected": [...]}, the prompt's messages and
  each answer as assistant messages (what trl calls conversational preference data);
- kto: {"prompt": [...], "completion": [...], "label": true | false}, an answer marked good or bad.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backpropagate_api.errors import ConfigError, NotFoundError
from backpropagate_api.ids import checked_id
from backpropagate_services.common.store import ArtifactStore

if TYPE_CHECKING:  # importing backpropagate loads the SDK, which imports this module
    pass

Conversation = list[dict[str, str]]
# What supervised fine-tuning trains on: a conversation, or a document of plain text.
SftRow = Conversation | str
# {"prompt", "chosen", "rejected"} or {"prompt", "completion", "label"}: see the layout above.
PreferenceRow = dict[str, Any]

PAIRED_FORMAT = "preference"
UNPAIRED_FORMAT = "kto"
PREFERENCE_FORMATS = (PAIRED_FORMAT, UNPAIRED_FORMAT)
TEXT_FORMAT = "text"
# Rows left out that a dataset's record (info.json, DatasetInfo) keeps as examples: it counts
# the rest. A file of a million repeated rows must not make a record of a million lines.
KEPT_ROW_EXAMPLES = 100
# The preview of a dataset's first row: each text cut to this many characters, each list to
# this many items, so a row of megabytes does not make a record (or an answer) of megabytes.
PREVIEW_CHARACTERS = 1000
PREVIEW_ITEMS = 20


@dataclass(frozen=True)
class RowRejection:
    """A row left out of a dataset, and why: what a user needs to fix it."""

    line: int  # the file's own, 1-based
    code: str  # the error code it would have failed with (INPUT_DATASET_SCHEMA, ...)
    field: str  # "" when the row as a whole is wrong
    reason: str


@dataclass
class LeftOut:
    """Rows left out of a dataset for one kind of reason (invalid, or a filter's): how many, and
    the first KEPT_ROW_EXAMPLES of them, whatever the file holds."""

    count: int = 0
    examples: list[RowRejection] = field(default_factory=list)

    def add(self, row: RowRejection) -> None:
        self.count += 1
        if len(self.examples) < KEPT_ROW_EXAMPLES:
            self.examples.append(row)


@dataclass(frozen=True)
class DatasetRecord:
    dataset_id: str
    format: str
    num_examples: int
    num_turns: int
    size_bytes: int
    filename: str
    # The first row, as stored (chat rows: the messages), shortened (`shortened`).
    preview: Conversation | dict[str, Any]
    rows_read: int = 0  # non-blank lines; 0 in records written before rows were counted
    rejections: tuple[RowRejection, ...] = ()  # the first rows left out, in file order
    removed: tuple[RowRejection, ...] = ()  # the first good rows a filter took out (duplicates)
    rows_rejected: int = 0  # rows left out in all
    rows_removed: int = 0  # rows filters took out in all


def find_record(store: ArtifactStore, dataset_id: str) -> DatasetRecord | None:
    """The dataset's record if it was prepared (completely), else None."""
    try:
        return load_record(store, dataset_id)
    except NotFoundError:
        return None


def _prefix(dataset_id: str) -> str:
    return f"datasets/{checked_id(dataset_id, 'dataset')}"


class DatasetWriter:
    """A dataset's normalised rows, written to a local file as they come and then stored: an
    upload of any size holds one row at a time."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "data.jsonl"
        self._file = self.path.open("w", encoding="utf-8")
        self.rows = 0
        self.turns = 0
        self.first: dict[str, Any] | None = None

    def add(self, row: dict[str, Any]) -> None:
        """One row as stored: {"messages": [...]}, {"text": ...} or a preference row (see the
        layout above)."""
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.rows += 1
        self.turns += sum(len(value) for value in row.values() if isinstance(value, list))
        if self.first is None:
            self.first = row

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()

    def save(
        self,
        store: ArtifactStore,
        dataset_id: str,
        source_format: str,
        filename: str,
        size_bytes: int,
        rejected: LeftOut | None = None,
        removed: LeftOut | None = None,
    ) -> DatasetRecord:
        """Store the rows, then info.json: a reader that finds info.json finds all the data."""
        self._file.close()
        assert self.first is not None, "a dataset has rows"
        rejected, removed = rejected or LeftOut(), removed or LeftOut()
        record = DatasetRecord(
            dataset_id=dataset_id,
            format=source_format,
            num_examples=self.rows,
            num_turns=self.turns,
            size_bytes=size_bytes,
            filename=filename,
            preview=shortened(self.first.get("messages", self.first)),
            rows_read=self.rows + rejected.count + removed.count,
            rejections=tuple(rejected.examples),
            removed=tuple(removed.examples),
            rows_rejected=rejected.count,
            rows_removed=removed.count,
        )
        store.put_file(f"{_prefix(dataset_id)}/data.jsonl", self.path)
        store.put_json(f"{_prefix(dataset_id)}/info.json", asdict(record))
        return record


def shortened(value: Any) -> Any:
    """`value` with each string cut to PREVIEW_CHARACTERS (saying how much more there is) and
    each list to its first PREVIEW_ITEMS: a preview of a row, never the whole of a huge one."""
    if isinstance(value, str) and len(value) > PREVIEW_CHARACTERS:
        rest = len(value) - PREVIEW_CHARACTERS
        return f"{value[:PREVIEW_CHARACTERS]}... ({rest:,} more characters)"
    if isinstance(value, list):
        return [shortened(item) for item in value[:PREVIEW_ITEMS]]
    if isinstance(value, dict):
        return {key: shortened(item) for key, item in value.items()}
    return value


def save_dataset(
    store: ArtifactStore,
    dataset_id: str,
    source_format: str,
    rows: Iterable[dict[str, Any]],
    filename: str,
    size_bytes: int,
) -> DatasetRecord:
    """Store rows given whole (`chat_rows(conversations)` or preference rows)."""
    with (
        tempfile.TemporaryDirectory(prefix="bp-dataset-") as staging,
        DatasetWriter(Path(staging)) as writer,
    ):
        for row in rows:
            writer.add(row)
        return writer.save(store, dataset_id, source_format, filename, size_bytes)


def chat_rows(conversations: Iterable[Conversation]) -> Iterator[dict[str, Any]]:
    """Conversations as a chat dataset stores them."""
    return ({"messages": conversation} for conversation in conversations)


def load_record(store: ArtifactStore, dataset_id: str) -> DatasetRecord:
    key = f"{_prefix(dataset_id)}/info.json"
    if not store.exists(key):
        raise NotFoundError(
            f"No dataset with id {dataset_id!r}.",
            hint="Upload it first (`backprop train --data FILE` does it for you).",
            dataset_id=dataset_id,
        )
    stored = store.get_json(key)
    for name, count in (("rejections", "rows_rejected"), ("removed", "rows_removed")):
        stored[name] = tuple(RowRejection(**row) for row in stored.get(name, ()))
        stored.setdefault(count, len(stored[name]))  # a record from before rows were counted
    return DatasetRecord(**stored)


# What a format's rows hold, and the training methods that can use them. KTO takes pairs too: trl
# splits each into a good and a bad answer.
_CHAT = ("chat conversations", ("sft",))
_KINDS = {
    TEXT_FORMAT: ("documents of plain text", ("sft",)),
    PAIRED_FORMAT: (
        'prompts with a chosen and a rejected answer ({"prompt", "chosen", "rejected"})',
        ("dpo", "orpo", "simpo", "kto"),
    ),
    UNPAIRED_FORMAT: (
        'answers labelled good or bad ({"prompt", "completion", "label"})',
        ("kto",),
    ),
}


def check_method_fits(method: str, dataset_format: str, dataset_id: str = "") -> None:
    """ConfigError unless `method` trains on this format's kind of rows: sft on chat or text,
    dpo / orpo / simpo on preference pairs, kto on pairs or labelled answers."""
    holds, methods = _KINDS.get(dataset_format, _CHAT)
    if method in methods:
        return
    needed = [rows for rows, fits in (*_KINDS.values(), _CHAT) if method in fits]
    raise ConfigError(
        f"{f'Dataset {dataset_id}' if dataset_id else 'The dataset'} ({dataset_format}) holds "
        f"{holds}: method {method} cannot train on it.",
        hint=f"Train it with --method {' or '.join(methods)}, or upload "
        f"{' or '.join(needed)} for {method}.",
        fields="method",
        dataset_id=dataset_id,
        format=dataset_format,
    )


def load_sft_rows(store: ArtifactStore, dataset_id: str) -> list[SftRow]:
    """A chat dataset's conversations, or a text dataset's documents (ConfigError for
    preference data)."""
    record = load_record(store, dataset_id)  # only complete datasets are readable
    check_method_fits("sft", record.format, dataset_id)
    return [
        row["messages"] if "messages" in row else row["text"] for row in _rows(store, dataset_id)
    ]


def load_preference_rows(store: ArtifactStore, dataset_id: str, method: str) -> list[PreferenceRow]:
    """A preference dataset's rows, as stored (ConfigError if `method` cannot use them)."""
    check_method_fits(method, load_record(store, dataset_id).format, dataset_id)
    return _rows(store, dataset_id)


def _rows(store: ArtifactStore, dataset_id: str) -> list[dict[str, Any]]:
    text = store.get_bytes(f"{_prefix(dataset_id)}/data.jsonl").decode()
    return [json.loads(line) for line in text.split("\n") if line.strip()]
