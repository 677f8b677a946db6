"""Claims export jobs: adapter from the store -> verified GGUF back into the store."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from backpropagate.v1 import common_pb2, export_pb2, trainer_pb2
from backpropagate_services.common.jobs import JobWorker, run_recorded
from backpropagate_services.common.layout import (
    EXPORT_QUEUE,
    adapter_prefix,
    export_artifact_key,
    run_record_key,
)
from backpropagate_services.common.layout import export_events_channel as events_channel
from backpropagate_services.common.layout import export_record_key as record_key
from backpropagate_services.common.logs import run_context
from backpropagate_services.common.models import resolve_model
from backpropagate_services.common.queue import Job
from backpropagate_services.common.records import load_record, publish, save_record
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.export.pipeline import export_gguf


class ExportWorker(JobWorker):
    name = "export-worker"
    queue_name = EXPORT_QUEUE

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime.queue, runtime.settings.queue.visibility_timeout_seconds)
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

    def handle(self, job: Job) -> None:
        export_id = str(job.payload["export_id"])
        result = load_record(self.store, record_key(export_id), export_pb2.ExportResult, "export")
        with run_context(result.run_id):
            message = run_recorded(result, lambda: self.export(result))
            save_record(self.store, record_key(export_id), result)
            self.emit(result, message=message, error=result.error)

    def export(self, result: export_pb2.ExportResult) -> str:
        settings = self.runtime.settings
        run = load_record(self.store, run_record_key(result.run_id), trainer_pb2.RunRecord, "run")
        result.status = common_pb2.JOB_STATUS_RUNNING
        save_record(self.store, record_key(result.export_id), result)
        source = resolve_model(run.base_model)

        def on_stage(stage: str, index: int, count: int, message: str) -> None:
            self.emit(result, stage=stage, stage_index=index, stage_count=count, message=message)

        with tempfile.TemporaryDirectory(prefix="bp-export-") as tmp:
            work = Path(tmp)
            adapter_dir = self.store.get_dir(adapter_prefix(run.run_id), work / "adapter")
            outcome = export_gguf(
                source,
                adapter_dir,
                work / "build",
                quantization=result.quantization or None,
                prompt=result.smoke_prompt,
                cache_dir=settings.model_cache_dir,
                settings=settings.export,
                on_stage=on_stage,
            )
            result.quantization = outcome.quantization
            result.artifact_key = export_artifact_key(
                result.export_id, source.slug, run.run_id, outcome.quantization
            )
            self.store.put_file(result.artifact_key, outcome.gguf_path)
        result.size_bytes = outcome.size_bytes
        result.sha256 = outcome.sha256
        verification = outcome.verification
        result.verification.CopyFrom(
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
                merge_error=outcome.merge_error,
            )
        )
        result.smoke_answer = outcome.smoke_answer
        return f"exported {result.artifact_key}"
