"""ExportService: queues exports, streams their progress, serves artifacts."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from backpropagate_api.errors import ConfigError, UserError
from backpropagate_api.grpc_errors import translate_errors
from backpropagate_api.ids import new_id
from backpropagate_api.layout import EXPORT_QUEUE, run_record_key
from backpropagate_api.layout import export_events_channel as events_channel
from backpropagate_api.layout import export_record_key as record_key
from backpropagate_api.statuses import TERMINAL_STATUSES
from backpropagate_api.tracing import tag_run
from backpropagate_api.v1 import common_pb2, export_pb2, export_pb2_grpc, trainer_pb2
from backpropagate_services.common.jobs import cancel_job, job_payload
from backpropagate_services.common.records import (
    checked_cursor,
    follow,
    load_record,
    publish,
    save_record,
)
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.common.service import ServiceHandle
from backpropagate_services.export.downloads import artifact_chunks
from backpropagate_services.export.hub import validate_repo_id
from backpropagate_services.export.pipeline import check_format
from backpropagate_services.export.quantize import check_quantization
from backpropagate_services.export.smoke import DEFAULT_SMOKE_PROMPT
from backpropagate_services.export.worker import ExportWorker

SERVICE_NAME = export_pb2.DESCRIPTOR.services_by_name["ExportService"].full_name


# The smoke test asks the exported model one short question; a prompt longer than this would
# only fill the model's context (and the worker's time) late, after the merge and conversion.
MAX_SMOKE_PROMPT_CHARS = 4000


class ExportServicer(export_pb2_grpc.ExportServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.store = runtime.store
        self.queue = runtime.queue
        self.watch_idle_seconds = runtime.settings.server.watch_idle_seconds

    def _result(self, export_id: str) -> export_pb2.ExportResult:
        return load_record(self.store, record_key(export_id), export_pb2.ExportResult, "export")

    @translate_errors
    def SubmitExport(
        self, request: export_pb2.SubmitExportRequest, context: grpc.ServicerContext
    ) -> export_pb2.SubmitExportResponse:
        export_format = check_format(request.format)
        if len(request.smoke_prompt) > MAX_SMOKE_PROMPT_CHARS:
            raise ConfigError(
                f"The smoke prompt is {len(request.smoke_prompt):,} characters; at most "
                f"{MAX_SMOKE_PROMPT_CHARS:,} are taken.",
                hint="A short question is all the smoke test needs.",
                fields="smoke_prompt",
            )
        if request.quantization:
            check_quantization(request.quantization)
        if request.hub_repo:
            validate_repo_id(request.hub_repo)
            if export_format not in ("adapter", "hf"):
                raise ConfigError(
                    f"A Hub push takes the adapter or the merged model, not {export_format}.",
                    hint="Push with format adapter (default) or hf (merged).",
                    format=export_format,
                )
        run = load_record(self.store, run_record_key(request.run_id), trainer_pb2.RunRecord, "run")
        tag_run(run.run_id)
        if run.status != common_pb2.JOB_STATUS_SUCCEEDED:
            raise UserError(
                f"Run {run.run_id} is {common_pb2.JobStatus.Name(run.status)}: only a run that "
                "succeeded has an adapter to export.",
                hint="Wait for the run (`backprop runs show RUN_ID`) or train again.",
                run_id=run.run_id,
            )
        export_id = new_id("export")
        result = export_pb2.ExportResult(
            export_id=export_id,
            run_id=run.run_id,
            status=common_pb2.JOB_STATUS_QUEUED,
            format=export_format,
            quantization=request.quantization,
            smoke_prompt=request.smoke_prompt or DEFAULT_SMOKE_PROMPT,
            hub_repo=request.hub_repo,
            hub_private=request.hub_private,
        )
        save_record(self.store, record_key(export_id), result)
        publish(
            self.queue,
            events_channel(export_id),
            export_pb2.ExportEvent(
                export_id=export_id, run_id=run.run_id, status=result.status, message="queued"
            ),
        )
        self.queue.enqueue(EXPORT_QUEUE, job_payload(export_id=export_id))
        return export_pb2.SubmitExportResponse(export_id=export_id)

    @translate_errors
    def WatchExport(
        self, request: export_pb2.WatchExportRequest, context: grpc.ServicerContext
    ) -> Iterator[export_pb2.ExportEvent]:
        after = checked_cursor(self.queue, request.after_event_id)
        self._result(request.export_id)
        yield from follow(
            self.queue,
            events_channel(request.export_id),
            export_pb2.ExportEvent,
            context.is_active,
            has_ended=lambda: self._result(request.export_id).status in TERMINAL_STATUSES,
            after=after,
            idle_seconds=self.watch_idle_seconds,
        )

    @translate_errors
    def GetExport(
        self, request: export_pb2.GetExportRequest, context: grpc.ServicerContext
    ) -> export_pb2.ExportResult:
        return self._result(request.export_id)

    @translate_errors
    def CancelExport(
        self, request: export_pb2.CancelExportRequest, context: grpc.ServicerContext
    ) -> export_pb2.ExportResult:
        result = self._result(request.export_id)
        cancel_job(
            self.queue,
            self.store,
            result,
            record_key(result.export_id),
            events_channel(result.export_id),
            lambda: export_pb2.ExportEvent(
                export_id=result.export_id,
                run_id=result.run_id,
                status=result.status,
                message="cancelled before it started",
                timestamp=time.time(),
            ),
        )
        return result

    @translate_errors
    def DownloadArtifact(
        self, request: export_pb2.DownloadArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[export_pb2.ArtifactChunk]:
        yield from artifact_chunks(self.store, request)


def create(runtime: Runtime) -> ServiceHandle:
    servicer = ExportServicer(runtime)
    return ServiceHandle(
        name="export",
        grpc_service_name=SERVICE_NAME,
        register=lambda server: export_pb2_grpc.add_ExportServiceServicer_to_server(
            servicer, server
        ),
        workers=[ExportWorker(runtime)],
    )
