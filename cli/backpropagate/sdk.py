"""The three-line Python API.

from backpropagate import Trainer
trainer = Trainer()                      # or any HF id, local HF dir, or .gguf file
run = trainer.train("my_data.jsonl", steps=100)
exported = trainer.export("gguf", quantization="q8_0")
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, TypeVar

from rich.console import Console

from backpropagate.background import start_background_worker
from backpropagate.callbacks import TrainingCallback, follow_calling
from backpropagate.connection import Connection, start_client_tracing
from backpropagate.dataset_sources import DataSource, check_source, dataset_file
from backpropagate.progress import export_progress, train_progress
from backpropagate.results import ExportResult, MemoryEstimateResult, RunResult
from backpropagate.workflows import (
    estimate_memory,
    export,
    follow_run,
    import_adapter,
    push,
    resume_run,
    submit_multi_run,
    submit_train,
    upload_dataset,
)
from backpropagate_api.errors import ConfigError, UserError
from backpropagate_api.settings import Settings, get_settings
from backpropagate_api.tracing import span, tag_run
from backpropagate_api.uploads import listed
from backpropagate_api.v1 import dataprep_pb2, trainer_pb2

F = TypeVar("F", bound=Callable[..., Any])
P = TypeVar("P")
ADAPTER_SUBDIRECTORY = "lora"


def _batch_size(value: int | Literal["auto"]) -> int:
    return 0 if value == "auto" else value


def _trackers(report_to: str | Sequence[str] | None) -> list[str]:
    """report_to as TrainConfig takes it: "wandb" or ["wandb", "mlflow"]; None: not given."""
    if report_to is None:
        return []
    return [report_to] if isinstance(report_to, str) else list(report_to)


def adapter_of_mode(mode: str) -> str:
    """`mode` ("lora", "full"), the documented spelling of `adapter` for full fine-tuning."""
    if mode not in ("", "lora", "full"):
        raise UserError(
            f"Unknown mode {mode!r}: the modes are lora and full.",
            hint="For DoRA, rsLoRA or QLoRA use adapter= (--adapter).",
        )
    return mode


def check_backend(backend: str) -> None:
    """Training runs where the trainer service runs, on its CUDA GPU or else its CPU: "auto" is
    the one backend. MLX (Apple Silicon) is not offered, and says what to use instead."""
    if backend in ("", "auto"):
        return
    if backend.lower() == "mlx":
        raise ConfigError(
            "MLX (Apple Silicon) training is not offered: runs train with torch, on a CUDA GPU "
            "or else the CPU.",
            hint="Leave --backend out (backend='auto'). On a Mac the embedded default trains on "
            "the CPU (slowly); for speed train on a machine with a CUDA GPU, then `backprop "
            "export` and run the GGUF on the Mac with llama.cpp or Ollama.",
            backend=backend,
        )
    raise ConfigError(
        f"Unknown backend {backend!r}: the one backend is auto.",
        hint="Leave --backend out: auto trains on the CUDA GPU where there is one, else the CPU.",
        backend=backend,
    )


def adapter_directory(output_dir: str | Path) -> Path:
    """Where a run's adapter is saved under `output_dir`: the product's `./output/lora`."""
    return Path(output_dir) / ADAPTER_SUBDIRECTORY


def check_output_directory(output_dir: str | Path | None) -> None:
    """Refuse, before anything trains, an output directory whose adapter directory holds
    something other than an adapter an earlier run saved there (which a run replaces)."""
    if output_dir is None:
        return
    target = adapter_directory(output_dir)
    if not target.exists():
        return
    if not target.is_dir() or not (
        (target / "adapter_config.json").is_file() or not any(target.iterdir())
    ):
        raise UserError(
            f"{target} holds something other than a saved adapter; a run would replace it.",
            hint="Pick another --output-dir (output_dir=), or move that away first.",
            path=str(target),
        )


def client_span(name: str) -> Callable[[F], F]:
    """Run a Trainer method in a span named `name`, this process's tracing started first."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def in_span(self: Trainer, *args: Any, **kwargs: Any) -> Any:
            start_client_tracing(self.settings or get_settings())
            with span(name):
                return method(self, *args, **kwargs)

        return in_span  # type: ignore[return-value]

    return decorate


class Trainer:
    def __init__(
        self,
        model: str = "",
        *,
        lora_r: int = 0,
        lora_alpha: int = 0,
        lora_dropout: float | None = None,
        learning_rate: float = 0.0,
        batch_size: int | Literal["auto"] = "auto",
        gradient_accumulation: int = 0,
        max_seq_length: int = 0,
        warmup_ratio: float | None = None,
        weight_decay: float | None = None,
        max_grad_norm: float | None = None,
        target_modules: list[str] | None = None,
        seed: int = 0,
        report_to: str | Sequence[str] | None = None,
        adapter: str = "",
        mode: str = "",
        output_dir: str | Path | None = None,
        backend: str = "auto",
        settings: Settings | None = None,
        progress: bool = True,
    ) -> None:
        """`model`: HF id, local HF directory, .gguf file, or "" for this machine's default.

        The hyperparameters are the defaults of this Trainer's train() calls; one given to
        train() wins. As in train(), 0, None and batch_size "auto" leave the choice to the
        trainer (settings, preset, built-in default); `max_seq_length` is train()'s
        `max_length`. `mode` "full" or "lora" is the product's older name for `adapter`.
        `report_to`: experiment trackers, "auto" (every one installed where the
        trainer runs: tensorboard, wandb, mlflow), "none", or names, e.g. ["tensorboard"].
        `output_dir`: where each run's adapter is saved when it ends, as `<output_dir>/lora`
        (replacing an earlier run's; `backprop export ./output/lora` takes it); None keeps it in
        the store only (`save()` writes it later). `backend`: "auto", the one there is (MLX is
        not offered).
        """
        check_backend(backend)
        self.model = model
        self.output_dir = output_dir
        # What train() starts from: its own arguments are merged over these.
        self._defaults = trainer_pb2.TrainConfig(
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            learning_rate=learning_rate,
            batch_size=_batch_size(batch_size),
            gradient_accumulation=gradient_accumulation,
            max_length=max_seq_length,
            warmup_ratio=warmup_ratio,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            target_modules=target_modules or [],
            seed=seed,
            report_to=_trackers(report_to),
            adapter=adapter or adapter_of_mode(mode),
        )
        # Progress and the dataset summary go to stderr, so stdout stays for results.
        self.console = Console(stderr=True) if progress else None
        self.settings = settings
        self._connection: Connection | None = None
        self._has_workers = False
        self.last_run: RunResult | None = None

    def _progress(self, kind: Callable[[Console, float], P]) -> P | nullcontext[None]:
        """The progress display of `kind` (train_progress, export_progress), if this Trainer
        shows progress: a bar on a terminal, plain lines at the settings' interval elsewhere."""
        if self.console is None:
            return nullcontext()
        interval = (self.settings or get_settings()).progress_interval_seconds
        return kind(self.console, interval)

    @property
    def connection(self) -> Connection:
        """Opened on first use: with no endpoint set, that starts the embedded stack, whose
        workers then run this process's jobs."""
        return self._open(workers=True)

    def _open(self, workers: bool) -> Connection:
        if self._connection is None or (workers and not self._has_workers):
            if self._connection is not None:
                self._connection.close()  # a reading one, replaced by one whose stack works
            self._connection = Connection.open(self.settings, workers=workers)
            self._has_workers = workers
        return self._connection

    def _with_defaults(self, given: trainer_pb2.TrainConfig) -> trainer_pb2.TrainConfig:
        """`given` over the constructor's hyperparameters: the wire's own convention decides
        what train() left unset (0, an unset optional, an empty list)."""
        config = trainer_pb2.TrainConfig()
        config.CopyFrom(self._defaults)
        for name in ("target_modules", "report_to"):  # lists: replaced, not extended
            if getattr(given, name):
                config.ClearField(name)  # type: ignore[arg-type]
        config.MergeFrom(given)
        return config

    @client_span("backprop train")
    def train(
        self,
        data: DataSource,
        *,
        steps: int = 0,
        epochs: float = 0.0,
        batch_size: int | Literal["auto"] = 0,
        learning_rate: float = 0.0,
        lora_r: int = 0,
        lora_alpha: int = 0,
        max_length: int = 0,
        seed: int = 0,
        data_format: str = "auto",
        gradient_accumulation: int = 0,
        checkpoint_every: int = 0,
        oom_recovery: bool = True,
        lora_dropout: float | None = None,
        warmup_ratio: float | None = None,
        weight_decay: float | None = None,
        max_grad_norm: float | None = None,
        target_modules: list[str] | None = None,
        method: str = "",
        adapter: str = "",
        fp8: bool = False,
        preset: str = "",
        lora_preset: str = "",
        lr_scheduler: str = "",
        eval_split: float = 0.0,
        eval_data: DataSource | None = None,
        eval_every: int = 0,
        early_stopping_patience: int = 0,
        beta: float | None = None,
        min_tokens: int = 0,
        max_tokens: int = 0,
        perplexity_drop: float = 0.0,
        curriculum: str = "",
        adapter_scale: float = 0.0,
        nproc_per_node: int = 0,
        report_to: str | Sequence[str] | None = None,
        callback: TrainingCallback | None = None,
        wait: bool = True,
        strict: bool = False,
        columns: Mapping[str, str] | None = None,
        dedup: str = "",
        languages: Sequence[str] = (),
    ) -> RunResult:
        """Fine-tune a LoRA adapter on a JSONL dataset; 0 means the trainer's default.

        The budget: `steps` optimizer steps, or `epochs` passes over the data (not both);
        neither: a few epochs, worked out from the dataset's size (the run record says why).

        `checkpoint_every`: steps between checkpoints (0: every few minutes, and at the end).
        `oom_recovery=False`: fail on out-of-memory instead of halving the micro-batch.
        `wait=False`: submit and return the queued run at once (`watch` or `resume` it later);
        with the embedded default a background worker process trains it.
        `lora_dropout`, `warmup_ratio`, `weight_decay`, `max_grad_norm`, `target_modules`: None
        keeps the trainer's default (0 is a value: no dropout, no warmup, no decay).
        `method`: sft (default) or dpo, orpo, simpo, kto on a preference dataset; `adapter`:
        lora (default), dora, rslora, qlora (CUDA) or full. `preset` (fast, balanced, quality)
        and `lora_preset` fill what is not given. `eval_split` (a fraction) or `eval_data` (a
        file) give an eval loss every `eval_every` steps; the run ends with the best weights by
        it, and stops after `early_stopping_patience` evaluations without improvement.
        `report_to`: experiment trackers, as in Trainer(). `callback`: a TrainingCallback
        called as the run goes (it needs wait=True: `watch(run_id, callback=...)` follows a
        run submitted with wait=False). `strict`: a bad row in the data fails the upload;
        otherwise bad rows are left out and listed, up to 10% of the rows. `columns`: a CSV,
        TSV or Parquet file's columns renamed to a format's fields ({"question":
        "instruction", "answer": "output"}). `dedup`: "exact" removes rows whose text repeats
        an earlier one, "near" also near-copies (MinHash, similarity 0.8 or more).
        `languages` (["en"], ...): rows detected in another language are removed.
        `min_tokens` / `max_tokens` leave out rows outside those lengths, `perplexity_drop` the
        fraction the base model finds least likely; `curriculum` ("length", "perplexity") takes
        the first pass easiest first. `adapter_scale` < 1 scales the trained update down at the
        end, toward the base model (0: the default, which the data budget may lower).
        `nproc_per_node`: processes training the run together, one per GPU (0: one); each
        takes its share of every step's `batch_size`, which stays the optimizer's batch.
        Arguments left out take the Trainer's values.
        """
        if callback is not None and not wait:
            raise UserError(
                "A callback is called while the run is followed, and wait=False follows nothing.",
                hint="Pass the callback to watch(run_id, callback=...) instead.",
            )
        check_source(data)  # before anything slow: a typo should fail at once
        if eval_data is not None:
            check_source(eval_data)
        self._check_output(wait)
        connection = self._open(workers=wait)
        upload = (data_format, strict, columns, dedup, languages)
        dataset = self._upload(connection, data, *upload)
        eval_dataset_id = (
            self._upload(connection, eval_data, *upload).dataset_id if eval_data is not None else ""
        )
        config = trainer_pb2.TrainConfig(
            base_model=self.model,
            steps=steps,
            epochs=epochs,
            batch_size=_batch_size(batch_size),
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
            report_to=_trackers(report_to),
            method=method,
            adapter=adapter,
            fp8=fp8,
            preset=preset,
            lora_preset=lora_preset,
            lr_scheduler=lr_scheduler,
            eval_split=eval_split,
            eval_dataset_id=eval_dataset_id,
            eval_every=eval_every,
            early_stopping_patience=early_stopping_patience,
            beta=beta,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
            perplexity_drop=perplexity_drop,
            curriculum=curriculum,
            adapter_scale=adapter_scale,
            nproc_per_node=nproc_per_node,
        )
        config = self._with_defaults(config)
        run_id = submit_train(connection, dataset.dataset_id, config)
        tag_run(run_id)
        return self._follow_submitted(connection, run_id, wait, callback)

    def _follow_submitted(
        self,
        connection: Connection,
        run_id: str,
        wait: bool,
        callback: TrainingCallback | None,
    ) -> RunResult:
        """Follow a run just queued to its end; with wait=False its queued record (in the
        embedded default a background worker process trains it)."""
        if not wait:
            self.start_worker()
            self.last_run = self.run(run_id)
            return self.last_run
        run = self.watch(run_id, callback=callback)
        if self.output_dir is not None:
            self._save_into(adapter_directory(self.output_dir), "adapter", run.run_id)
        return run

    def _check_output(self, wait: bool) -> None:
        """Before anything is uploaded: the output directory can take the adapter."""
        if self.output_dir is not None and not wait:
            raise UserError(
                "output_dir saves the adapter when the run ends, which wait=False (--detach) "
                "does not wait for.",
                hint="Leave --detach out, or save it later: `backprop runs save RUN DIR`.",
            )
        check_output_directory(self.output_dir)

    def start_worker(self) -> None:
        """Make sure a job queued without waiting gets done: in the embedded default, where no
        server runs, a detached worker process takes this home's queued jobs until it has none
        (a remote stack's workers need no help). The web UI queues every job this way."""
        if self.reader.embedded:
            # This Trainer's settings, not the environment's: its home holds the run.
            start_background_worker(self.settings or get_settings())

    def multi_run(
        self,
        data: DataSource | Sequence[DataSource] | None = None,
        *,
        runs: int = 0,
        steps_per_run: int = 100,
        samples_per_run: int = 0,
        merge: str = "",
        with_replacement: bool = False,
        continue_from: str = "",
        replay: float | None = None,
        learning_rate: float = 0.0,
        batch_size: int | Literal["auto"] = 0,
        max_length: int = 0,
        seed: int = 0,
        lora_r: int = 0,
        lora_alpha: int = 0,
        target_modules: list[str] | None = None,
        adapter: str = "",
        eval_split: float = 0.0,
        checkpoint_every: int = 0,
        data_format: str = "auto",
        callback: TrainingCallback | None = None,
        wait: bool = True,
        dataset: DataSource | None = None,
        num_runs: int = 0,
        merge_mode: str = "",
    ) -> RunResult:
        """Train again and again on new data without forgetting: a campaign of `runs` runs of
        `steps_per_run` steps, each going on from the last, each run's adapter merged into the
        campaign's by `merge` ("slao", the default; "last-merge", "no-qr", "average",
        "sequential").

        `data`: one dataset, from which each run draws `samples_per_run` rows no other run has
        (0: an equal share), or a list of datasets, one per run. `with_replacement`: runs draw
        from the whole pool on their own and may share rows. `continue_from`: a finished
        campaign whose merged adapter this one goes on from. `replay`: rehearsal, each run
        also trains on rows the campaign's earlier runs trained on, this share of its own
        (None: the trainer's default, a tenth more, which measured best against forgetting;
        0: none). The result is the campaign's
        record: its runs, the merge timeline and the merged adapter, which exports like any
        run's. `dataset`, `num_runs` and `merge_mode` are other names of `data`, `runs` and
        `merge`. Other arguments as in train().
        """
        data = data if data is not None else dataset
        if data is None:
            raise UserError("Nothing to train on.", hint="Pass data= (a file, or one per run).")
        sources = list(data) if isinstance(data, list | tuple) else [data]
        for source in sources:
            check_source(source)
        self._check_output(wait)
        connection = self._open(workers=wait)
        dataset_ids = [
            self._upload(connection, source, data_format).dataset_id for source in sources
        ]
        config = trainer_pb2.TrainConfig(
            base_model=self.model,
            steps=steps_per_run,
            learning_rate=learning_rate,
            batch_size=_batch_size(batch_size),
            max_length=max_length,
            seed=seed,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            target_modules=target_modules or [],
            adapter=adapter,
            eval_split=eval_split,
            checkpoint_every=checkpoint_every,
        )
        multi_run = trainer_pb2.MultiRunConfig(
            runs=runs or num_runs or (0 if len(sources) > 1 else 5),
            samples_per_run=samples_per_run,
            merge=merge or merge_mode,
            with_replacement=with_replacement,
            continue_from=continue_from,
            replay=replay,  # None leaves it unset: the trainer's default
        )
        campaign_id = submit_multi_run(
            connection, dataset_ids, self._with_defaults(config), multi_run
        )
        return self._follow_submitted(connection, campaign_id, wait, callback)

    def inspect_data(
        self,
        data: DataSource,
        data_format: str = "auto",
        columns: Mapping[str, str] | None = None,
        dedup: str = "",
        languages: Sequence[str] = (),
        strict: bool = False,
    ) -> dataprep_pb2.DatasetInfo:
        """Validate and store `data` as a run would, and return its record: format, counts, the
        rows left out and why, the duplicates removed, the first example. Nothing trains."""
        check_source(data)
        with dataset_file(data) as path:
            return upload_dataset(
                self.reader, path, data_format, strict, columns, dedup, languages=languages
            )

    def inspect_tokens(
        self, dataset_id: str, *, max_length: int = 0, method: str = ""
    ) -> trainer_pb2.TokenStats:
        """A stored dataset (`inspect_data(...).dataset_id`) in this Trainer's model's tokens, as
        a run would see it: row lengths and their histogram, the rows max_length truncates or
        leaves with nothing to learn, and the first row with its trained tokens marked.
        `max_length` and `method`: train()'s (0 and "": the trainer's choice)."""
        connection = self.reader
        request = trainer_pb2.InspectTokensRequest(
            config=trainer_pb2.TrainConfig(
                base_model=self.model, max_length=max_length, method=method
            ),
            dataset_id=dataset_id,
        )
        return connection.call("trainer", connection.trainer.InspectTokens, request)

    def _upload(
        self,
        connection: Connection,
        data: DataSource,
        data_format: str,
        strict: bool = False,
        columns: Mapping[str, str] | None = None,
        dedup: str = "",
        languages: Sequence[str] = (),
    ) -> dataprep_pb2.DatasetInfo:
        with dataset_file(data) as path:
            dataset = upload_dataset(
                connection, path, data_format, strict, columns, dedup, languages=languages
            )
        self._show_dataset(dataset)
        return dataset

    def _show_dataset(self, dataset: dataprep_pb2.DatasetInfo) -> None:
        """The uploaded dataset in a line, and the rows left out of it (the first 20)."""
        if self.console is None:
            return
        self.console.print(
            f"dataset [bold]{dataset.filename}[/]: {dataset.num_examples} {dataset.format} "
            f"examples ([dim]{dataset.dataset_id[:12]}[/])"
            + (", prepared before" if dataset.reused else "")
        )
        if dataset.rows_removed:
            self.console.print(f"{dataset.rows_removed} duplicate rows removed")
        if not dataset.rows_rejected:
            return
        self.console.print(
            f"[yellow]{dataset.rows_rejected} of {dataset.rows_read} rows left out[/] "
            "(--strict fails on the first instead):"
        )
        for line in listed(dataset.rejections, dataset.rows_rejected):
            self.console.print(f"  {line}", markup=False)

    def estimate_memory(
        self,
        data: DataSource | None = None,
        *,
        batch_size: int | Literal["auto"] = 0,
        gradient_accumulation: int = 0,
        max_length: int = 0,
        lora_r: int = 0,
        lora_dropout: float | None = None,
        target_modules: list[str] | None = None,
        adapter: str = "",
        method: str = "",
        preset: str = "",
        lora_preset: str = "",
        data_format: str = "auto",
    ) -> MemoryEstimateResult:
        """Predict the peak memory of train() with these arguments on the machine that would
        train, in seconds: only the model's config is read, no weights.

        `data`: the JSONL file to train on, whose longest conversations size the activations;
        None assumes every conversation fills max_length. The other arguments are train()'s
        (0 and None: the trainer's choice); arguments left out take the Trainer's values.
        """
        connection = self.reader
        dataset_id = ""
        if data is not None:
            check_source(data)
            with dataset_file(data) as path:
                dataset_id = upload_dataset(connection, path, data_format).dataset_id
        config = trainer_pb2.TrainConfig(
            base_model=self.model,
            batch_size=_batch_size(batch_size),
            gradient_accumulation=gradient_accumulation,
            max_length=max_length,
            lora_r=lora_r,
            lora_dropout=lora_dropout,
            target_modules=target_modules or [],
            adapter=adapter,
            method=method,
            preset=preset,
            lora_preset=lora_preset,
        )
        estimate = estimate_memory(connection, self._with_defaults(config), dataset_id)
        return MemoryEstimateResult.from_proto(estimate)

    estimate_vram = estimate_memory  # the name the product's documentation uses

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

    def watch(self, run_id: str, *, callback: TrainingCallback | None = None) -> RunResult:
        """Follow a run (from its first event) until it ends; its result, or its error.
        `callback`: a TrainingCallback called as it goes."""
        with self._progress(train_progress) as bar:
            self.last_run = follow_calling(
                callback, bar, lambda on_event: follow_run(self.reader, run_id, on_event)
            )
        return self.last_run

    def replay(self, run_id: str, *, callback: TrainingCallback | None = None) -> RunResult:
        """Train a new run with `run_id`'s config and dataset, and follow it to its end."""
        connection = self.connection
        request = trainer_pb2.GetRunRequest(run_id=run_id)
        record = connection.call("trainer", connection.trainer.GetRun, request)
        return self.watch(
            submit_train(connection, record.dataset_id, record.config), callback=callback
        )

    def resume(self, run_id: str, *, callback: TrainingCallback | None = None) -> RunResult:
        """Continue a run that did not finish (its process died, it was stopped for safety
        or cancelled) from its last checkpoint, and follow it to its end."""
        with self._progress(train_progress) as bar:
            self.last_run = follow_calling(
                callback, bar, lambda on_event: resume_run(self.connection, run_id, on_event)
            )
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
        with self._progress(export_progress) as bar:
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
        return self._save_into(target, "hf" if merged else "adapter", run_id)

    def _save_into(self, target: Path, export_format: str, run_id: str) -> Path:
        """`target` replaced by the export's directory, which is downloaded beside it first:
        it never holds half a download."""
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".bp-save-") as tmp:
            result = self.export(export_format, run_id=run_id, output_dir=tmp)
            if target.exists():  # os.replace cannot replace a directory: move it aside first
                target.rename(Path(tmp) / ".replaced")
            os.replace(result.path, target)
        return target

    def push(
        self, repo: str, *, run_id: str = "", merged: bool = False, private: bool = False
    ) -> str:
        """Push the adapter (or `merged`, the merged model) with a generated model card to the
        Hugging Face Hub repo `repo` ("me/name"); returns the repo's URL. The export service
        pushes, with its HF_TOKEN (the embedded default: this process's)."""
        run_id = self._run_to_use(run_id, "push")
        with self._progress(export_progress) as bar:
            return push(
                self.connection, run_id, repo, merged=merged, private=private, on_event=bar
            ).hub_url
