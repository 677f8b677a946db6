"""TrainerService: queues train jobs, reports runs, streams their events."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import grpc

from backpropagate_api.errors import ConfigError, UserError
from backpropagate_api.grpc_errors import translate_errors
from backpropagate_api.ids import new_id
from backpropagate_api.layout import TRAIN_QUEUE
from backpropagate_api.layout import run_events_channel as events_channel
from backpropagate_api.layout import run_record_key as record_key
from backpropagate_api.statuses import TERMINAL_STATUSES
from backpropagate_api.tracing import current_traceparent, tag_run
from backpropagate_api.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc
from backpropagate_services.common.datasets import (
    DatasetRecord,
    SftRow,
    load_preference_rows,
    load_sft_rows,
)
from backpropagate_services.common.datasets import load_record as load_dataset_record
from backpropagate_services.common.hardware import detect
from backpropagate_services.common.jobs import cancel_job, job_payload
from backpropagate_services.common.models import (
    ModelSource,
    resolve_model,
    resolve_model_for,
)
from backpropagate_services.common.records import (
    checked_cursor,
    follow,
    load_record,
    publish,
    save_record,
)
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.common.service import ServiceHandle
from backpropagate_services.trainer.adapters.lora import check_adapter_supported
from backpropagate_services.trainer.data.token_stats import token_stats
from backpropagate_services.trainer.imports import import_adapter, receive_adapter_files
from backpropagate_services.trainer.loop.preference import check_method
from backpropagate_services.trainer.multirun.campaign import finished_merge
from backpropagate_services.trainer.multirun.campaign_plan import (
    CampaignPlan,
    check_campaign_config,
    check_continuable,
    settle_campaign,
)
from backpropagate_services.trainer.planning.config import (
    check_processes,
    training_config_from_proto,
)
from backpropagate_services.trainer.planning.defaults import settle
from backpropagate_services.trainer.planning.memory_estimate import (
    estimate_run_memory,
    matmul_shapes,
    micro_batch_rows,
    preference_conversations,
    read_tokenizer,
)
from backpropagate_services.trainer.planning.memory_plan import MemoryPlan, fit_to_gpu
from backpropagate_services.trainer.run_listing import list_runs_page
from backpropagate_services.trainer.runtime.safety_monitor import SafetyMonitor
from backpropagate_services.trainer.runtime.tracking import resolve_report_to
from backpropagate_services.trainer.runtime.worker import TrainWorker

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.queue = runtime.queue

    def _record(self, run_id: str) -> trainer_pb2.RunRecord:
        return load_record(self.store, record_key(run_id), trainer_pb2.RunRecord, "run")

    def _job_record(self, run_id: str) -> trainer_pb2.RunRecord:
        """The record of the run whose job trains `run_id`: a campaign's run is resumed or
        cancelled with its campaign."""
        record = self._record(run_id)
        return self._record(record.campaign_id) if record.campaign_id else record

    @translate_errors
    def SubmitTrain(
        self, request: trainer_pb2.SubmitTrainRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.SubmitTrainResponse:
        # Every check a user can fail happens here, synchronously, before anything is queued.
        source = self._check_model(request.config.base_model, context)
        dataset = load_dataset_record(self.store, request.dataset_id)
        settled, budget_reason, memory_plan = self._settle(
            request.config, dataset, dataset.num_examples, source
        )
        record = self._new_record("run", request.dataset_id, settled, settled.steps)
        record.budget_reason = budget_reason
        if memory_plan is not None:
            record.memory_plan.CopyFrom(memory_plan.record())
        return self._queue(record)

    @translate_errors
    def SubmitMultiRun(
        self, request: trainer_pb2.SubmitMultiRunRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.SubmitTrainResponse:
        if not request.dataset_ids:
            raise ConfigError("A campaign needs a dataset.", hint="Pass --data.", fields="data")
        source = self._check_model(request.config.base_model, context)
        datasets = [
            load_dataset_record(self.store, dataset_id) for dataset_id in request.dataset_ids
        ]
        multi_run = settle_campaign(request.multi_run, [d.num_examples for d in datasets])
        plan = CampaignPlan(
            multi_run.runs,
            multi_run.samples_per_run,
            multi_run.with_replacement,
            0,
            tuple(request.dataset_ids),
        )
        run_rows = len(plan.rows_of(1, datasets[0].num_examples))
        check_campaign_config(request.config)
        settled, _, memory_plan = self._settle(request.config, datasets[0], run_rows, source)
        settled.adapter_scale = 1  # the merge decides what each run keeps
        record = self._new_record(
            "campaign", request.dataset_ids[0], settled, settled.steps * multi_run.runs
        )
        if memory_plan is not None:
            record.memory_plan.CopyFrom(memory_plan.record())
        record.campaign.config.CopyFrom(multi_run)
        record.campaign.dataset_ids.extend(request.dataset_ids)
        if multi_run.continue_from:
            earlier = self._record(multi_run.continue_from)
            check_continuable(earlier, record)
            record.campaign.tasks_before = finished_merge(self.store, earlier.run_id).tasks
        return self._queue(record)

    def _check_model(self, spec: str, context: grpc.ServicerContext) -> ModelSource:
        """The base model `spec` names, if this caller may name it (resolve_model_for)."""
        models = self.runtime.settings.model
        return resolve_model_for(context.peer(), spec, models.name, models.allowed_dirs)

    def _settle(
        self,
        given: trainer_pb2.TrainConfig,
        dataset: DatasetRecord,
        num_examples: int,
        source: ModelSource,
    ) -> tuple[trainer_pb2.TrainConfig, str, MemoryPlan | None]:
        """`given` with every default filled in for this dataset, checked as a worker would,
        and on a GPU fitted to it (`memory_plan`): the reason for its budget, and the plan."""
        if given.eval_dataset_id:
            load_dataset_record(self.store, given.eval_dataset_id)
        settled, budget_reason = settle(given, self.runtime.settings, num_examples)
        config = training_config_from_proto(settled)
        check_processes(settled)
        check_method(config, dataset, settled.eval_dataset_id)  # chat data for sft, pairs for dpo
        resolve_report_to(settled.report_to)  # a tracker named but not installed: refused now
        hardware = detect(self.runtime.settings.trainer.cpu_dtype, home=self.runtime.settings.home)
        check_adapter_supported(config, cuda=hardware.is_cuda, fp8_capable=hardware.fp8)
        rows = self._training_rows(dataset.dataset_id, config.method) if hardware.is_cuda else None
        settings = self.runtime.settings
        memory_plan = fit_to_gpu(settled, source, settings.model_cache_dir, hardware, rows)
        return settled, budget_reason, memory_plan

    def _new_record(
        self, kind: str, dataset_id: str, config: trainer_pb2.TrainConfig, steps: int
    ) -> trainer_pb2.RunRecord:
        source = resolve_model(config.base_model, self.runtime.settings.model.name)
        return trainer_pb2.RunRecord(
            run_id=new_id(kind),
            status=common_pb2.JOB_STATUS_QUEUED,
            dataset_id=dataset_id,
            base_model=source.spec,
            steps=steps,
            created_at=time.time(),
            config=config,
            trace_parent=current_traceparent(),
        )

    def _queue(self, record: trainer_pb2.RunRecord) -> trainer_pb2.SubmitTrainResponse:
        """Save the new run's record, announce it and queue its job."""
        tag_run(record.run_id)
        save_record(self.store, record_key(record.run_id), record)
        publish(
            self.queue,
            events_channel(record.run_id),
            trainer_pb2.RunEvent(
                run_id=record.run_id,
                status=record.status,
                total_steps=record.steps,
                kind="queued",
                message="queued"
                + (f"; {record.memory_plan.reason}" if record.HasField("memory_plan") else ""),
                timestamp=time.time(),
            ),
        )
        self.queue.enqueue(TRAIN_QUEUE, job_payload(run_id=record.run_id))
        return trainer_pb2.SubmitTrainResponse(run_id=record.run_id)

    @translate_errors
    def WatchRun(
        self, request: trainer_pb2.WatchRunRequest, context: grpc.ServicerContext
    ) -> Iterator[trainer_pb2.RunEvent]:
        after = checked_cursor(self.queue, request.after_event_id)
        self._record(request.run_id)  # NOT_FOUND for a run that does not exist

        def is_final(event: trainer_pb2.RunEvent) -> bool:
            """The last event of the run, not that of an attempt the run was resumed after."""
            if event.run_id != request.run_id:  # a campaign's run ended, not the campaign
                return False
            record = self._record(request.run_id)
            return record.status in TERMINAL_STATUSES and event.attempt == record.attempts

        yield from follow(
            self.queue,
            events_channel(request.run_id),
            trainer_pb2.RunEvent,
            context.is_active,
            is_final,
            has_ended=lambda: self._record(request.run_id).status in TERMINAL_STATUSES,
            after=after,
            idle_seconds=self.runtime.settings.server.watch_idle_seconds,
        )

    @translate_errors
    def GetRun(
        self, request: trainer_pb2.GetRunRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.RunRecord:
        return self._record(request.run_id)

    @translate_errors
    def ListRuns(
        self, request: trainer_pb2.ListRunsRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.ListRunsResponse:
        return list_runs_page(self.store, request)

    @translate_errors
    def ImportAdapter(
        self,
        request_iterator: Iterator[trainer_pb2.ImportAdapterRequest],
        context: grpc.ServicerContext,
    ) -> trainer_pb2.RunRecord:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise UserError("An adapter import must start with a header message.")
        with tempfile.TemporaryDirectory(prefix="bp-adapter-") as tmp:
            adapter_dir = receive_adapter_files(
                (message.chunk for message in request_iterator), Path(tmp)
            )
            record = import_adapter(
                self.store,
                adapter_dir,
                first.header.base_model,
                resolve=lambda spec: self._check_model(spec, context),
            )
        save_record(self.store, record_key(record.run_id), record)
        return record

    @translate_errors
    def ResumeRun(
        self, request: trainer_pb2.ResumeRunRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.RunRecord:
        record = self._job_record(request.run_id)
        if record.status == common_pb2.JOB_STATUS_SUCCEEDED:
            raise UserError(
                f"Run {record.run_id} has already finished.",
                hint="Export it, or train again with more --steps.",
                run_id=record.run_id,
            )
        waiting = record.status == common_pb2.JOB_STATUS_QUEUED and not record.job_id
        live = record.status in (common_pb2.JOB_STATUS_QUEUED, common_pb2.JOB_STATUS_RUNNING)
        if waiting or (live and self.queue.is_pending(TRAIN_QUEUE, record.job_id)):
            return record  # its job is still queued or held: a worker goes on with it
        # The record says QUEUED before the job exists: a worker that claims it at once must not
        # find the run ended and drop it.
        record.status = common_pb2.JOB_STATUS_QUEUED
        record.ClearField("error")
        save_record(self.store, record_key(record.run_id), record)
        publish(
            self.queue,
            events_channel(record.run_id),
            trainer_pb2.RunEvent(
                run_id=record.run_id,
                status=record.status,
                total_steps=record.steps,
                step=record.last_checkpoint_step,
                kind="queued",
                attempt=record.attempts,
                message=f"queued to resume from step {record.last_checkpoint_step}"
                if record.last_checkpoint_step
                else "queued to start again (no checkpoint yet)",
                timestamp=time.time(),
            ),
        )
        self.queue.enqueue(TRAIN_QUEUE, job_payload(run_id=record.run_id))
        return record

    @translate_errors
    def CancelRun(
        self, request: trainer_pb2.CancelRunRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.RunRecord:
        record = self._job_record(request.run_id)
        cancel_job(
            self.queue,
            self.store,
            record,
            record_key(record.run_id),
            events_channel(record.run_id),
            lambda: trainer_pb2.RunEvent(
                run_id=record.run_id,
                status=record.status,
                message="cancelled before it started",
                timestamp=time.time(),
            ),
        )
        return record

    @translate_errors
    def EstimateMemory(
        self, request: trainer_pb2.EstimateMemoryRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.MemoryEstimate:
        # The config SubmitTrain would settle, checked the same way; the dataset only for its
        # token lengths.
        settings = self.runtime.settings
        dataset = None
        if request.dataset_id:
            dataset = load_dataset_record(self.store, request.dataset_id)
        settled, _ = settle(request.config, settings, dataset.num_examples if dataset else 1)
        config = training_config_from_proto(settled)
        source = self._check_model(request.config.base_model, context)
        shapes = matmul_shapes(source, settings.model_cache_dir)
        hardware = detect(settings.trainer.cpu_dtype, shapes, settings.home)
        check_adapter_supported(config, cuda=hardware.is_cuda, fp8_capable=hardware.fp8)
        conversations = None
        if dataset is not None:
            conversations = self._training_rows(dataset.dataset_id, config.method)
        # On a GPU, the run as SubmitTrain would fit it; on a CPU, as the worker would run it.
        plan = fit_to_gpu(settled, source, settings.model_cache_dir, hardware, conversations)
        if plan is not None:
            parts = plan.estimate
        else:
            rows_per_pass = micro_batch_rows(
                config, hardware, accumulation_given=bool(settled.gradient_accumulation)
            )
            parts = estimate_run_memory(
                source, settings.model_cache_dir, config, hardware, rows_per_pass, conversations
            )
        return trainer_pb2.MemoryEstimate(
            device=parts.device,
            total_bytes=parts.total_bytes,
            weights_bytes=parts.weights_bytes,
            trainable_bytes=parts.trainable_bytes,
            activations_bytes=parts.activations_bytes,
            overhead_bytes=parts.overhead_bytes,
            available_bytes=parts.available_bytes,
            fits=parts.fits,
            parameters=parts.parameters,
            trainable_parameters=parts.trainable_parameters,
            plan=plan.record() if plan is not None else None,
        )

    @translate_errors
    def InspectTokens(
        self, request: trainer_pb2.InspectTokensRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.TokenStats:
        settings = self.runtime.settings
        dataset = load_dataset_record(self.store, request.dataset_id)
        settled, _ = settle(request.config, settings, dataset.num_examples)
        config = training_config_from_proto(settled)
        source = self._check_model(request.config.base_model, context)
        rows = self._training_rows(dataset.dataset_id, config.method)
        stats = token_stats(
            rows, read_tokenizer(source, settings.model_cache_dir), config.max_length
        )
        return trainer_pb2.TokenStats(
            base_model=source.name,
            max_length=config.max_length,
            rows=stats.rows,
            tokens=stats.tokens,
            trained_tokens=stats.trained_tokens,
            min_tokens=stats.lengths[0] if stats.lengths else 0,
            median_tokens=stats.median if stats.lengths else 0,
            p95_tokens=stats.p95 if stats.lengths else 0,
            max_tokens=stats.lengths[-1] if stats.lengths else 0,
            histogram=[trainer_pb2.LengthBin(**asdict(part)) for part in stats.histogram],
            truncated=stats.truncated,
            dropped=stats.dropped,
            sample=[trainer_pb2.SampleSpan(**asdict(span)) for span in stats.sample],
        )

    def _training_rows(self, dataset_id: str, method: str) -> list[SftRow]:
        """A dataset's rows as the trainer tokenises them for `method`: conversations or
        documents for sft, each preference answer after its prompt otherwise."""
        if method == "sft":
            return load_sft_rows(self.store, dataset_id)
        rows = load_preference_rows(self.store, dataset_id, method)
        return list(preference_conversations(rows))


def create(runtime: Runtime) -> ServiceHandle:
    safety = SafetyMonitor.for_settings(runtime.settings)
    servicer = TrainerServicer(runtime)
    workers = [TrainWorker(runtime, safety) for _ in range(runtime.settings.trainer.workers)]
    return ServiceHandle(
        name="trainer",
        grpc_service_name=SERVICE_NAME,
        register=lambda server: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(
            servicer, server
        ),
        workers=[safety, *workers],
    )
