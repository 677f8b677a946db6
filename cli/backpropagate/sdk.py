"""The three-line Python API.

from backpropagate import Trainer
trainer = Trainer()                      # or any HF id, local HF dir, or .gguf file
run = trainer.train("my_data.jsonl", steps=100)
exported = trainer.export("gguf", quantization="q8_0")
"""

from __future__ import annotations

import os
import tempfile
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console

from backpropagate.background import start_background_worker
from backpropagate.connection import Connection
from backpropagate.progress import ExportProgress, TrainProgress
from backpropagate.results import ExportResult, RunResult
from backpropagate.v1 import trainer_pb2
from backpropagate.workflows import (
    export,
    follow_run,
    import_adapter,
    push,
    require_dataset_file,
    resume_run,
    submit_train,
    upload_dataset,
)
from backpropagate_services.common.errors import UserError
from backpropagate_services.common.settings import Settings, get_settings


class Trainer:
    def __init__(
        self, model: str = "", *, settings: Settings | None = None, progress: bool = True
    ) -> None:
        """`model`: HF id, local HF directory, .gguf file, or "" for this machine's default."""
        self.model = model
        # Progress and the dataset summary go to stderr, so stdout stays for results.
        self.console = Console(stderr=True) if progress else None
        self.settings = settings
        self._connection: Connection | None = None
        self._has_workers = False
        self.last_run: RunResult | None = None

    @property
    def connection(self) -> Connection:
        """Opened on first use: with no endpoint set, that starts the embedded stack, whose
        workers then run this process's jobs."""
        return self._open(workers=True)

    def _open(self, workers: bool) -> Connection:
        if self._connection is None or (workers and not self._has_workers):
            self._connection = Connection.open(self.settings, workers=workers)
            self._has_workers = workers
        return self._connection

    def train(
        self,
        data: str | Path,
        *,
        steps: int = 0,
        epochs: float = 0.0,
        batch_size: int = 0,
        learning_rate: float = 0.0,
        lora_r: int = 0,
        lora_alpha: int = 0,
        max_length: int = 0,
        seed: int = 42,
        data_format: str = "auto",
        gradient_accumulation: int = 0,
        checkpoint_every: int = 0,
        oom_recovery: bool = True,
        lora_dropout: float | None = None,
        warmup_ratio: float | None = None,
        weight_decay: float | None = None,
        max_grad_norm: float | None = None,
        target_modules: list[str] | None = None,
        wait: bool = True,
    ) -> RunResult:
        """Fine-tune a LoRA adapter on a JSONL dataset; 0 means the trainer's default.

        The budget: `steps` optimizer steps, or `epochs` passes over the data (not both);
        neither: the trainer's default of 100 steps.

        `checkpoint_every`: steps between checkpoints (0: every few minutes, and at the end).
        `oom_recovery=False`: fail on out-of-memory instead of halving the micro-batch.
        `wait=False`: submit and return the queued run at once (`watch` or `resume` it later);
        with the embedded default a background worker process trains it.
        `lora_dropout`, `warmup_ratio`, `weight_decay`, `max_grad_norm`, `target_modules`: None
        keeps the trainer's default (0 is a value: no dropout, no warmup, no decay).
        """
        require_dataset_file(Path(data))  # before anything slow: a typo should fail at once
        connection = self._open(workers=wait)
        dataset = upload_dataset(connection, Path(data), data_format)
        if self.console is not None:
            self.console.print(
                f"dataset [bold]{dataset.filename}[/]: {dataset.num_examples} {dataset.format} "
                f"examples ([dim]{dataset.dataset_id[:12]}[/])"
            )
        config = trainer_pb2.TrainConfig(
            base_model=self.model,
            steps=steps,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            max_length=max_length,
            seed=seed,
            gradient_accumulation=gradient_accumulation,
            checkpoint_every=checkpoint_every,
            disable_oom_recovery=not oom_recovery,
            lora_dropout=lora_dropout,
            warmup_ratio=warmup_ratio,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            target_modules=target_modules or [],
        )
        run_id = submit_train(connection, dataset.dataset_id, config)
        if not wait:
            if connection.embedded:
                start_background_worker((self.settings or get_settings()).home)
            self.last_run = self.run(run_id)
            return self.last_run
        return self.watch(run_id)

    @property
    def reader(self) -> Connection:
        """A connection to read and submit with: in the embedded default, opening it takes no
        jobs in this process (that waits for train, resume or replay)."""
        return self._open(workers=False) if self._connection is None else self._connection

    def run(self, run_id: str) -> RunResult:
        """The run's record as it is now."""
        connection = self.reader
        request = trainer_pb2.GetRunRequest(run_id=run_id)
        return RunResult.from_proto(connection.call("trainer", connection.trainer.GetRun, request))

    def watch(self, run_id: str) -> RunResult:
        """Follow a run (from its first event) until it ends; its result, or its error."""
        with TrainProgress(self.console) if self.console else nullcontext() as bar:
            self.last_run = follow_run(self.reader, run_id, bar)
        return self.last_run

    def replay(self, run_id: str) -> RunResult:
        """Train a new run with `run_id`'s config and dataset, and follow it to its end."""
        connection = self.connection
        request = trainer_pb2.GetRunRequest(run_id=run_id)
        record = connection.call("trainer", connection.trainer.GetRun, request)
        return self.watch(submit_train(connection, record.dataset_id, record.config))

    def resume(self, run_id: str) -> RunResult:
        """Continue a run that did not finish (its process died, it was stopped for safety
        or cancelled) from its last checkpoint, and follow it to its end."""
        with TrainProgress(self.console) if self.console else nullcontext() as bar:
            self.last_run = resume_run(self.connection, run_id, bar)
        return self.last_run

    def _run_to_use(self, run_id: str, what: str) -> str:
        """`run_id`, else the last run trained here; a local adapter directory is imported as
        a run first, on this Trainer's model or else the one its config names."""
        run_id = run_id or (self.last_run.run_id if self.last_run else "")
        if not run_id:
            raise UserError(f"Nothing to {what} yet.", hint="Call train() first or pass run_id=.")
        if Path(run_id).is_dir():
            return import_adapter(self.connection, Path(run_id), self.model).run_id
        return run_id

    def export(
        self,
        export_format: str = "gguf",
        *,
        quantization: str = "",
        run_id: str = "",
        output_dir: str | Path = ".",
        prompt: str = "",
    ) -> ExportResult:
        """Merge the adapter, write a verified GGUF and download it into `output_dir`.

        quantization "" picks the one that keeps this model's answers intact. `run_id` may also
        be a local adapter directory (what `save()` or peft wrote): it is imported as a run
        first, on the base model this Trainer names, or else the one its config names.
        """
        run_id = self._run_to_use(run_id, "export")
        with ExportProgress(self.console) if self.console else nullcontext() as bar:
            return export(
                self.connection,
                run_id,
                Path(output_dir),
                export_format=export_format,
                quantization=quantization,
                prompt=prompt,
                on_event=bar,
            )

    def save(self, directory: str | Path, *, run_id: str = "", merged: bool = False) -> Path:
        """Write the run's adapter (`merged`: the merged model, safetensors) into `directory`,
        loadable with peft (or transformers). The directory appears complete or not at all; an
        existing non-empty one is refused, never overwritten."""
        target = Path(directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise UserError(
                f"{target} already exists and is not an empty directory.",
                hint="Pick a new directory name, or remove that one first.",
                path=str(target),
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".bp-save-") as tmp:
            result = self.export("hf" if merged else "adapter", run_id=run_id, output_dir=tmp)
            if target.exists():
                target.rmdir()  # empty, checked above: os.replace cannot replace a directory
            os.replace(result.path, target)
        return target

    def push(
        self, repo: str, *, run_id: str = "", merged: bool = False, private: bool = False
    ) -> str:
        """Push the adapter (or `merged`, the merged model) with a generated model card to the
        Hugging Face Hub repo `repo` ("me/name"); returns the repo's URL. The export service
        pushes, with its HF_TOKEN (the embedded default: this process's)."""
        run_id = self._run_to_use(run_id, "push")
        with ExportProgress(self.console) if self.console else nullcontext() as bar:
            return push(
                self.connection, run_id, repo, merged=merged, private=private, on_event=bar
            ).hub_url
