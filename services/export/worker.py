"""Claims export jobs: adapter from the store -> verified GGUF back into the store."""

from __future__ import annotations

import tempfile
import time
from contextlib import suppress
from pathlib import Path

from backpropagate_api.errors import DependencyError, JobCancelledError
from backpropagate_api.layout import (
    EXPORT_QUEUE,
    adapter_prefix,
    export_file_key,
    run_record_key,
)
from backpropagate_api.layout import export_events_channel as events_channel
from backpropagate_api.layout import export_record_key as record_key
from backpropagate_api.statuses import TERMINAL_STATUSES
from backpropagate_api.uploads import sha256_file
from backpropagate_api.v1 import common_pb2, export_pb2, trainer_pb2
from backpropagate_services.common.datasets import load_record as load_dataset_record
from backpropagate_services.common.isolation import cancellable
from backpropagate_services.common.jobs import (
    JobWorker,
    cancel_requested,
    durably,
    run_recorded,
)
from backpropagate_services.common.logs import run_context
from backpropagate_services.common.models import resolve_model
from backpropagate_services.common.queue import Job
from backpropagate_services.common.records import load_record, publish, save_record
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.export.hub import (
    ModelCardInfo,
    build_model_card,
    push_to_hub,
    stage_upload,
)
from backpropagate_services.export.pipeline import ExportOutcome, export_model
from backpropagate_services.export.stage_timing import StageTimer


class ExportWorker(JobWorker):
    name = "export-worker"
    queue_name = EXPORT_QUEUE

    def __init__(self, runtime: Runtime) -> None:
        queue_settings = runtime.settings.queue
        super().__init__(
            runtime.queue, queue_settings.visibility_timeout_seconds, queue_settings.max_attempts
        )
        self.runtime = runtime
        self.store = runtime.store

    def emit(self, result: export_pb2.ExportResult, **fields: object) -> None:
        event = export_pb2.ExportEvent(
            export_id=result.export_id,
            run_id=result.run_id,
            status=result.status,
            timestamp=time.time(),
            **fields,  # type: ignore[arg-type]
        )
        publish(self.queue, events_channel(result.export_id), event)

    def job_record(self, job: Job) -> export_pb2.ExportResult:
        export_id = str(job.payload["export_id"])
        return durably(load_record)(
            self.store, record_key(export_id), export_pb2.ExportResult, "export"
        )

    def finish(self, result: export_pb2.ExportResult, message: str) -> None:
        durably(save_record)(self.store, record_key(result.export_id), result)
        self.emit(result, message=message, error=result.error)

    def handle(self, job: Job) -> None:
        result = self.job_record(job)
        if result.status in TERMINAL_STATUSES:
            return  # cancelled while queued, or redelivered after its outcome was saved
        with run_context(result.run_id):
            self.finish(result, run_recorded(result, lambda: self.export(result)))

    def push(
        self,
        result: export_pb2.ExportResult,
        run: trainer_pb2.RunRecord,
        outcome: ExportOutcome,
        work: Path,
    ) -> None:
        """Upload the adapter or merged model with a generated card; the record keeps the URL."""
        dataset = load_dataset_record(self.store, run.dataset_id) if run.dataset_id else None
        config = run.config
        info = ModelCardInfo(
            base_model=run.base_model,
            artifact="merged" if result.format == "hf" else "adapter",
            repo_id=result.hub_repo,
            run_id=run.run_id,
            dataset_file=dataset.filename if dataset else None,
            dataset_sha256=dataset.dataset_id if dataset else None,
            num_examples=dataset.num_examples if dataset else None,
            dataset_format=dataset.format if dataset else None,
            steps=run.steps or None,
            batch_size=config.batch_size or None,
            learning_rate=config.learning_rate or None,
            lora_r=config.lora_r or None,
            lora_alpha=config.lora_alpha or None,
            max_length=config.max_length or None,
            seed=config.seed or None,
            final_loss=run.final_loss or None,
            loss_history=list(run.loss_history) or None,
        )
        stage_upload(outcome.root, build_model_card(info), work)
        pushed = push_to_hub(
            work,
            result.hub_repo,
            private=result.hub_private,
            endpoint=self.runtime.settings.export.hub_endpoint,
        )
        result.hub_url, result.hub_commit = pushed.url, pushed.commit

    def export(self, result: export_pb2.ExportResult) -> str:
        settings = self.runtime.settings
        run = load_record(self.store, run_record_key(result.run_id), trainer_pb2.RunRecord, "run")
        result.status = common_pb2.JOB_STATUS_RUNNING
        save_record(self.store, record_key(result.export_id), result)
        source = resolve_model(run.base_model)

        should_stop = cancel_requested(self.queue, result.export_id)
        stages = StageTimer(result.format)

        def on_stage(stage: str, index: int, count: int, message: str) -> None:
            if should_stop():
                raise JobCancelledError(f"Cancelled before the {stage} stage.")
            stages.start(stage)
            self.emit(result, stage=stage, stage_index=index, stage_count=count, message=message)

        with (
            tempfile.TemporaryDirectory(prefix="bp-export-") as tmp,
            cancellable(should_stop),
            stages,
        ):
            work = Path(tmp)
            adapter_dir = self.store.get_dir(adapter_prefix(run.run_id), work / "adapter")
            outcome = export_model(
                source,
                adapter_dir,
                work / "build",
                export_format=result.format,
                quantization=result.quantization or None,
                prompt=result.smoke_prompt,
                cache_dir=settings.model_cache_dir,
                settings=settings.export,
                on_stage=on_stage,
            )
            result.quantization = outcome.quantization
            if result.hub_repo:
                on_stage("push", 1, 1, f"pushing to the Hugging Face Hub: {result.hub_repo}")
                self.push(result, run, outcome, work / "upload")
                return f"pushed to {result.hub_url}"
            names = download_names(outcome, result.format, source.slug, run.run_id)
            result.files.extend(self.store_files(result.export_id, names))
        main = result.files[0]
        in_directory = "/" in main.name  # hf and adapter: a directory, named by its prefix
        result.artifact_key = main.key.rpartition("/")[0] if in_directory else main.key
        result.sha256 = "" if in_directory else main.sha256
        result.size_bytes = sum(file.size_bytes for file in result.files)
        verification = outcome.verification
        report = export_pb2.ExportVerification(merge_error=outcome.merge_error, passed=True)
        if verification is not None:
            report.MergeFrom(
                export_pb2.ExportVerification(
                    positions=verification.positions,
                    decisive_positions=verification.decisive_positions,
                    top1_agreement=verification.top1_agreement,
                    top1_agreement_all=verification.top1_agreement_all,
                    mean_kl=verification.mean_kl,
                    passed=verification.passed,
                    min_top1_agreement=verification.gate.min_top1,
                    max_mean_kl=verification.gate.max_mean_kl or 0.0,
                    warning=verification.warning,
                    perplexity_reference=verification.perplexity_reference,
                    perplexity_gguf=verification.perplexity_gguf,
                )
            )
        result.verification.CopyFrom(report)
        result.smoke_answer = outcome.smoke_answer
        return f"exported {result.artifact_key}"

    def store_files(self, export_id: str, names: dict[str, Path]) -> list[export_pb2.ExportFile]:
        """Put the export's files in the store under their download names, all or none: if one
        fails (a full disk), those already put are deleted again, so a failed export neither
        lists nor keeps a file."""
        stored: list[export_pb2.ExportFile] = []
        try:
            for name, path in names.items():
                key = export_file_key(export_id, name)
                self.store.put_file(key, path)
                size, sha256 = path.stat().st_size, sha256_file(path)
                stored.append(
                    export_pb2.ExportFile(name=name, key=key, size_bytes=size, sha256=sha256)
                )
        except BaseException:
            with suppress(DependencyError):  # the store is away: the failure is what matters
                for file in stored:
                    self.store.delete_prefix(file.key)
            raise
        return stored


def download_names(
    outcome: ExportOutcome, export_format: str, model_slug: str, run_id: str
) -> dict[str, Path]:
    """Each file's download name, main file first. Names say what they are (model, run,
    quantisation), so the downloads of different exports never land on one name; the base GGUF
    of an adapter export is the same for every run, so it is named without one."""
    quantization = outcome.quantization
    if export_format in ("hf", "adapter"):
        return {
            f"{model_slug}-{run_id}-{export_format}/{name}": path
            for name, path in outcome.files.items()
        }
    if export_format == "adapter-gguf":
        adapter, base = outcome.files.values()
        return {
            f"{model_slug}-{run_id}-adapter.gguf": adapter,
            f"{model_slug}-base-{quantization}.gguf": base,
        }
    return {f"{model_slug}-{run_id}-{quantization}.gguf": outcome.main_file}
