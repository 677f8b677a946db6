"""What every page of the UI works with: the settings, the one output directory, and the SDK.

The UI holds no training logic: each page calls the `Trainer` SDK and its workflows, as the CLI
does, against the embedded default or the remote stack BACKPROPAGATE_ENDPOINT names. Its own
process only reads and submits (the embedded stack here runs no job workers): a job it queues
is done by the stack's workers, or in the embedded default by a detached worker process
(`Trainer.start_worker`), so a run goes on when the browser, or this process, goes away.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from backpropagate.connection import Connection
from backpropagate.sdk import Trainer
from backpropagate_api.private_files import private_directory
from backpropagate_api.settings import Settings

# The dataset files the Data page can pick besides uploads: the repository's examples.
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
DATASET_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".gz")


@dataclass
class UiContext:
    settings: Settings
    output_dir: Path  # checked by security.ui_output_dir: every file the UI writes is under it
    _trainers: dict[str, Trainer] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def trainer(self, model: str = "") -> Trainer:
        """The SDK for `model` ("": the stack's default), one per model for the process."""
        model = model.strip()
        with self._lock:
            if model not in self._trainers:
                self._trainers[model] = Trainer(model, settings=self.settings, progress=False)
            return self._trainers[model]

    @property
    def connection(self) -> Connection:
        """A connection that reads and submits (no job runs in the UI's process)."""
        return self.trainer().reader

    @property
    def exports_dir(self) -> Path:
        """Where exports are downloaded to, and the Chat page finds them."""
        return private_directory(self.output_dir / "exports")

    def dataset_files(self) -> list[Path]:
        """Files the Data page may pick: earlier uploads (Gradio keeps each in a folder of the
        output directory named by its hash) and the shipped examples. Nothing else: a picked
        name is checked against this list, so no page reads a file it did not offer."""
        uploads = [
            path
            for path in self.output_dir.glob("*/*")
            if path.parent.name != "exports" and path.is_file()
        ]
        examples = sorted(EXAMPLES.glob("*")) if EXAMPLES.is_dir() else []
        return [
            path
            for path in sorted(uploads, key=lambda p: p.stat().st_mtime, reverse=True) + examples
            if path.name.lower().endswith(DATASET_SUFFIXES)
        ]

    def exported_ggufs(self) -> list[Path]:
        """The GGUF files exported through the UI, newest first (what the Chat page offers)."""
        return sorted(
            self.exports_dir.glob("*.gguf"), key=lambda path: path.stat().st_mtime, reverse=True
        )
