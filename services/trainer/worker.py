"""Claims train jobs and runs them: dataset -> model -> LoRA training -> adapter in the store.

This is the service layer around the plain training domain (templating, lora, loop): it knows
about records, events, the store and cancellation; the domain knows only about tensors.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch

from backpropagate.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.datasets import load_conversations
from backpropagate_services.common.jobs import (
    ENDED,
    JobWorker,
    cancel_requested,
    durably,
    run_recorded,
)
from backpropagate_services.common.layout import (
    TRAIN_QUEUE,
    adapter_prefix,
    loss_curve_key,
)
from backpropagate_services.common.layout import run_events_channel as events_channel
from backpropagate_services.common.layout import run_record_key as record_key
from backpropagate_services.common.logs import run_context
from backpropagate_services.common.models import load_model, resolve_model
from backpropagate_services.common.queue import Job
from backpropagate_services.common.records import load_record, publish, save_record
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.trainer.config import training_config_from_proto
from backpropagate_services.trainer.loop import StepReport, train_lora
from backpropagate_services.trainer.plots import write_loss_curve
from backpropagate_services.trainer.safety_monitor import SafetyMonitor

log = logging.getLogger(__name__)

# The first event of every attempt at a run: a redelivered run shows it once per worker.
STARTED_MESSAGE = "loading dataset and model"


class TrainWorker(JobWorker):
    name = "train-worker"
    queue_name = TRAIN_QUEUE

    def __init__(self, runtime: Runtime, safety: SafetyMonitor) -> None:
        queue_settings = runtime.settings.queue
        super().__init__(
            runtime.queue, queue_settings.visibility_timeout_seconds, queue_settings.max_attempts
        )
        self.runtime = runtime
        self.store = runtime.store
        self.safety = safety

    def emit(self, record: trainer_pb2.RunRecord, **fields: object) -> None:
        event = trainer_pb2.RunEvent(
            run_id=record.run_id,
            status=record.status,
            total_steps=record.steps,
            safety_level=self.safety.level,  # type: ignore[arg-type]
            timestamp=time.time(),
            **fields,  # type: ignore[arg-type]
        )
        publish(self.queue, events_channel(record.run_id), event)

    def job_record(self, job: Job) -> trainer_pb2.RunRecord:
        run_id = str(job.payload["run_id"])
        return durably(load_record)(self.store, record_key(run_id), trainer_pb2.RunRecord, "run")

    def finish(self, record: trainer_pb2.RunRecord, message: str) -> None:
        durably(save_record)(self.store, record_key(record.run_id), record)
        self.emit(record, message=message, error=record.error, step=len(record.loss_history))

    def handle(self, job: Job) -> None:
        record = self.job_record(job)
        with run_context(record.run_id):
            if record.status in ENDED:
                log.info("run already %s: nothing to do", common_pb2.JobStatus.Name(record.status))
                return
            if job.deliveries > 1:
                log.warning("starting again a run whose worker died (delivery %d)", job.deliveries)
            self.finish(record, run_recorded(record, lambda: self.train(record)))

    def train(self, record: trainer_pb2.RunRecord) -> str:
        run_id = record.run_id
        record.status = common_pb2.JOB_STATUS_RUNNING
        save_record(self.store, record_key(run_id), record)
        self.emit(record, message=STARTED_MESSAGE)
        config = training_config_from_proto(record.config)
        conversations = load_conversations(self.store, record.dataset_id)
        source = resolve_model(record.base_model)
        if self.runtime.settings.trainer.threads > 0:
            torch.set_num_threads(self.runtime.settings.trainer.threads)
        model, tokenizer = load_model(source, self.runtime.settings.model_cache_dir)
        self.emit(record, message=f"training {source.name} for {config.steps} steps")

        def on_step(report: StepReport) -> None:
            record.loss_history.append(report.loss)  # kept per step: a failed run keeps its curve
            self.emit(
                record,
                step=report.step,
                loss=report.loss,
                learning_rate=report.learning_rate,
                tokens_per_second=report.tokens_per_second,
                eta_seconds=report.eta_seconds,
            )

        peft_model, outcome = train_lora(
            model,
            tokenizer,
            conversations,
            config,
            on_step=on_step,
            should_stop=cancel_requested(self.queue, run_id),
        )
        self.emit(record, step=config.steps, message="saving adapter")
        with tempfile.TemporaryDirectory(prefix="bp-adapter-") as tmp:
            peft_model.save_pretrained(tmp)
            self.store.put_dir(adapter_prefix(run_id), Path(tmp))
            curve = write_loss_curve(outcome.loss_history, Path(tmp) / "loss.png")
            self.store.put_file(loss_curve_key(run_id), curve)
        record.final_loss = outcome.final_loss
        record.samples_seen = outcome.samples_seen
        record.output = adapter_prefix(run_id) + "/"
        return f"done: final loss {record.final_loss:.4f}"
