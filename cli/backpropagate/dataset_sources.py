"""What a user hands over as data, as a file the dataprep service reads.

A JSONL, CSV, TSV or Parquet file goes as it is. A saved Hugging Face dataset directory
(`Dataset.save_to_disk`), a `datasets.Dataset` passed to the SDK, or a Hub id ("tatsu-lab/alpaca")
is written to Parquet here first, with the `datasets` library, so the service sees one kind of
table whatever the source; the `datasets` package is needed only for those.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from backpropagate_api.errors import (
    ConfigError,
    HubUnreachableError,
    MissingDependencyError,
    NotFoundError,
)

# owner/name, as the Hub spells dataset ids; a path with a file's extension is a missing file.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt"}
TRAIN_SPLIT = "train"
# A file's path, a saved dataset directory, a Hub id, or a datasets.Dataset / DatasetDict.
DataSource = str | Path | Any


def missing_file(path: Path) -> NotFoundError:
    return NotFoundError(
        f"Dataset file not found: {path}",
        hint="Pass the path of a JSONL file, e.g. examples/quickstart.jsonl.",
        path=str(path),
    )


def check_source(data: Any) -> None:
    """NotFoundError for a path that is neither a file, a directory nor a Hub id: before
    anything slow, so a typo fails at once."""
    if isinstance(data, str | Path) and not Path(data).exists() and not _is_hub_id(data):
        raise missing_file(Path(data))


@contextmanager
def dataset_file(data: Any) -> Iterator[Path]:
    """A file holding `data`, for as long as the context lasts."""
    if isinstance(data, str | Path) and Path(data).is_file():
        yield Path(data)
        return
    dataset, name = _as_dataset(data)
    with tempfile.TemporaryDirectory(prefix="bp-dataset-") as staging:
        path = Path(staging) / f"{name}.parquet"
        dataset.to_parquet(str(path))
        yield path


def _is_hub_id(data: str | Path) -> bool:
    text = str(data)
    return bool(HUB_ID.fullmatch(text)) and Path(text).suffix.lower() not in FILE_SUFFIXES


def _as_dataset(data: Any) -> tuple[Any, str]:
    """(a datasets.Dataset, a name for its file)."""
    if isinstance(data, str | Path):
        if Path(data).is_dir():
            return _train_split(_from_disk(Path(data)), str(data)), Path(data).name
        if _is_hub_id(data):
            return _from_hub(str(data)), str(data).replace("/", "__")
        raise missing_file(Path(data))
    if hasattr(data, "to_parquet") or hasattr(data, "keys"):
        return _train_split(data, "the dataset passed"), "dataset"
    raise ConfigError(
        f"Cannot train on a value of type {type(data).__name__}.",
        hint="Pass a dataset file (JSONL, CSV, TSV, Parquet), a saved dataset directory, a Hub "
        "dataset id or a datasets.Dataset.",
        fields="data",
    )


def _train_split(dataset: Any, source: str) -> Any:
    """A Dataset as it is; a DatasetDict's train split (the split to fine-tune on)."""
    if hasattr(dataset, "to_parquet"):
        return dataset
    if TRAIN_SPLIT not in dataset:
        raise ConfigError(
            f"{source} has the splits {', '.join(dataset)}, and no {TRAIN_SPLIT!r} split.",
            hint="Pass the split to train on: dataset['<split>'].",
            fields="data",
        )
    return dataset[TRAIN_SPLIT]


def _from_disk(directory: Path) -> Any:
    """A directory datasets.save_to_disk wrote (a Dataset or a DatasetDict)."""
    try:
        return _datasets().load_from_disk(str(directory))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{directory} is a directory, but not a dataset saved with save_to_disk.",
            hint="Pass a dataset file (JSONL, CSV, TSV, Parquet, TXT) inside it, or a directory "
            "that Dataset.save_to_disk wrote.",
            fields="data",
            path=str(directory),
        ) from exc


def _from_hub(dataset_id: str) -> Any:
    datasets = _datasets()
    try:
        return datasets.load_dataset(dataset_id, split=TRAIN_SPLIT)
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise NotFoundError(
            f"No dataset {dataset_id!r} on the Hugging Face Hub (or it is private).",
            hint="Check the id, or log in (`hf auth login`) for a private dataset.",
            dataset=dataset_id,
        ) from exc
    except (ConnectionError, OSError) as exc:  # offline: no route, HF_HUB_OFFLINE, no cache
        raise HubUnreachableError(
            f"Could not load {dataset_id!r} from the Hugging Face Hub: {exc}",
            hint="Connect to the network (or unset HF_HUB_OFFLINE), or save the dataset to a "
            "file on a connected machine and pass that file.",
            dataset=dataset_id,
        ) from exc


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise MissingDependencyError(
            "Reading a saved dataset directory, a Hub dataset or a Dataset object needs the "
            "datasets package.",
            hint="pip install datasets, or pass a JSONL, CSV, TSV or Parquet file.",
        ) from exc
    return datasets
