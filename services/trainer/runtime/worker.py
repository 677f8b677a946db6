"""Claims train jobs and runs them: dataset -> model -> LoRA training -> adapter in the store.

This is the service layer around the plain training domain (templating, lora, loop): it knows
about records, events, the store, checkpoints and the lease; the domain knows only about
tensors. A run whose record lists a checkpoint continues from it: that is how a redelivered job
(its worker died) or a resumed run goes on where it stopped.

A run with `nproc_per_node` > 1 trains in that many processes (`launcher`, `rank_process`):
rank 0 runs `train` as one process would, the others `follow` it (`ranks`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from backpropagate_api.errors import CheckpointInvalidError
from backpropagate_api.layout import TRAIN_QUEUE, adapter_prefix, loss_curve_key
from backpropagate_api.layout import run_record_key as record_key
from backpropagate_api.statuses import TERMINAL_STATUSES
from backpropagate_api.training import PREFERENCE_METHODS, TrainingConfig
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.datasets import SftRow, load_preference_rows, load_sft_rows
from backpropagate_services.common.hardware import (
    Hardware,
    detect,
    limit_malloc_arenas,
    peak_memory_bytes,
    reset_peak_memory,
)
from backpropagate_services.common.jobs import (
    JobWorker,
    Lease,
    durably,
    run_recorded,
)
from backpropagate_services.common.logs import run_context
from backpropagate_services.common.models import ModelSource, load_model, resolve_model
from backpropagate_services.common.queue import Job
from backpropagate_services.common.records import load_record, save_record
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.trainer.adapters.lora import check_adapter_supported
from backpropagate_services.trainer.data.selection import Selection
from backpropagate_services.trainer.loop.checkpoints import CheckpointManager, CheckpointPolicy
from backpropagate_services.trainer.loop.plots import write_loss_curve
from backpropagate_services.trainer.loop.preference import PreferenceTraining
from backpropagate_services.trainer.loop.sft import LoraTraining, split_for_eval
from backpropagate_services.trainer.multirun.campaign import CampaignRunner
from backpropagate_services.trainer.multirun.campaign_plan import CampaignPlan
from backpropagate_services.trainer.multirun.slao import Adapter
from backpropagate_services.trainer.planning.config import training_config_from_proto
from backpropagate_services.trainer.planning.defaults import machine_accumulation
from backpropagate_services.trainer.planning.memory_estimate import (
    matmul_shapes,
    preference_conversations,
)
from backpropagate_services.trainer.planning.memory_plan import fit_again_if_moved
from backpropagate_services.trainer.runtime.launcher import train_in_processes
from backpropagate_services.trainer.runtime.ranks import ONE_PROCESS, Ranks, RunEnded
from backpropagate_services.trainer.runtime.run_hooks import (
    RunEvents,
    RunHooks,
    job_run_id,
    save_while_held,
)
from backpropagate_services.trainer.runtime.run_metrics import RunMetrics
from backpropagate_services.trainer.runtime.safety_gate import SafetyGate
from backpropagate_services.trainer.runtime.safety_monitor import SafetyMonitor
from backpropagate_services.trainer.runtime.tracking import tracked

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# The first event of every attempt at a run: a redelivered run shows it once per worker.
STARTED_MESSAGE = "loading dataset and model"


class Prepared(NamedTuple):
    """A run set up to take its first step."""

    training: LoraTraining
    config: TrainingConfig
    tokenizer: PreTrainedTokenizerBase


class Orders(NamedTuple):
    """What rank 0 hands the other processes of a run as it starts an attempt: the run, and
    the hardware choice it made (a CPU's dtype probe, timed, could choose otherwise on each)."""

    record: bytes
    hardware: Hardware


def last_checkpoint(record: trainer_pb2.RunRecord) -> trainer_pb2.CheckpointInfo:
    """The checkpoint a run goes on from: the one of its last_checkpoint_step."""
    for info in record.checkpoints:
        if info.step == record.last_checkpoint_step:
            return info
    raise CheckpointInvalidError(
        f"Run {record.run_id} lists no checkpoint of step {record.last_checkpoint_step}.",
        run_id=record.run_id,
    )


class TrainWorker(JobWorker):
    name = "train-worker"
    queue_name = TRAIN_QUEUE

    def __init__(self, runtime: Runtime, safety: SafetyMonitor, ranks: Ranks = ONE_PROCESS) -> None:
        """`ranks`: this process's place among those training a run together (rank_process);
        a pool worker trains in one, starting others for a run that asks for them."""
        queue_settings = runtime.settings.queue
        super().__init__(
            runtime.queue, queue_settings.visibility_timeout_seconds, queue_settings.max_attempts
        )
        limit_malloc_arenas()  # before this worker's threads allocate: see memory_estimate
        self.runtime = runtime
        self.store = runtime.store
        self.safety = safety
        self.events = RunEvents(runtime.queue, safety)
        trainer = runtime.settings.trainer
        self.policy = CheckpointPolicy(trainer.keep_last_checkpoints, trainer.keep_best_checkpoints)
        self.ranks = ranks
        self.followers_told = False  # rank 0 of several: whether the others have their orders

    def stop(self, timeout: float = 5.0) -> None:
        """Give a running step the time to finish, checkpoint and release the job."""
        super().stop(max(timeout, self.runtime.settings.trainer.shutdown_grace_seconds))

    def job_record(self, job: Job) -> trainer_pb2.RunRecord:
        run_id = str(job.payload["run_id"])
        return durably(load_record)(self.store, record_key(run_id), trainer_pb2.RunRecord, "run")

    def finish(self, record: trainer_pb2.RunRecord, message: str) -> None:
        durably(save_record)(self.store, record_key(record.run_id), record)
        self.emit_ended(record, message)

    def emit_ended(self, record: trainer_pb2.RunRecord, message: str) -> None:
        """The run's last event, sent through a queue outage: watchers wait for it."""
        self.events.emit(
            record, kind="ended", message=message, error=record.error, step=len(record.loss_history)
        )
        durably(self.events.publisher.flush)()

    def handle(self, job: Job) -> None:
        record = self.job_record(job)
        with run_context(record.run_id):
            if record.status in TERMINAL_STATUSES:
                status = common_pb2.JobStatus.Name(record.status)
                log.info("run already %s: nothing to do", status)
                # Its last event may not have got out (the queue went away as it ended): again.
                self.emit_ended(record, f"already {status}")
                return
            assert self.lease is not None
            if record.config.nproc_per_node > 1 and self.ranks.world == 1:
                # Its processes run the attempt; rank 0 records it as this worker.
                train_in_processes(
                    self.runtime.settings,
                    job,
                    self.consumer,
                    record.config.nproc_per_node,
                    lambda: self.stopping,
                )
                return
            self.run_attempt(record, job, self.lease)

    def run_attempt(self, record: trainer_pb2.RunRecord, job: Job, lease: Lease) -> None:
        """Train the run here (alone, or as rank 0 of several) and record its outcome."""
        # Saved with the attempt's first record: in a pool, which worker (pod) runs it.
        record.worker = self.consumer
        with tracked(self.events, record, self.runtime.settings.tensorboard_dir):
            if record.HasField("campaign"):
                message = run_recorded(record, CampaignRunner(self, record, job, lease).run)
            else:
                message = run_recorded(record, lambda: self.train(record, job, lease))
            self.finish(record, message)

    def train(
        self,
        record: trainer_pb2.RunRecord,
        job: Job,
        lease: Lease,
        plan: CampaignPlan | None = None,
        start: Adapter | None = None,
    ) -> str:
        """Train the run of `record` (from its last checkpoint, if it has one). A campaign's
        run trains on the rows `plan` draws for it, from the adapter `start`."""
        run_id = record.run_id
        checkpoints = CheckpointManager(self.store, run_id, self.policy)
        cancel_cursor = self.events.cancel_cursor(job_run_id(record))
        resume_from = record.last_checkpoint_step
        if job.deliveries > 1 or record.attempts:
            log.warning(
                "attempt %d at this run (delivery %d): %s",
                record.attempts + 1,
                job.deliveries,
                f"resuming from step {resume_from}" if resume_from else "no checkpoint yet",
            )
        record.status = common_pb2.JOB_STATUS_RUNNING
        record.attempts += 1
        record.job_id = job.job_id
        record.resumed_from_step = resume_from
        record.world_size = self.ranks.world
        record.ClearField("error")
        save_while_held(lease, self.store, record)
        self.events.emit(record, kind="started", message=STARTED_MESSAGE)

        settings = self.runtime.settings
        source = resolve_model(record.base_model)
        self.use_threads()  # before the dtype probe, which times these threads
        hardware = detect(
            settings.trainer.cpu_dtype,
            matmul_shapes(source, settings.model_cache_dir),
            settings.home,
        )
        if self.ranks.world > 1:
            self.ranks.from_voice(Orders(record.SerializeToString(), hardware))
            self.followers_told = True
        training, config, tokenizer = self.prepare(
            record, checkpoints, source, hardware, plan, start
        )
        self._report_training(record, training, config, source, hardware)
        metrics = RunMetrics(run_id, hardware)
        hooks = RunHooks(
            record,
            self.events,
            checkpoints,
            lease,
            worker=self,
            cancel_cursor=cancel_cursor,
            release_on_shutdown=self.runtime.settings.trainer.release_on_shutdown,
            checkpoint_every=record.config.checkpoint_every,
            checkpoint_interval=self.runtime.settings.trainer.checkpoint_interval_seconds,
            safety_gate=SafetyGate(
                self.runtime.settings.safety.resume_after_seconds,
                configured=self.safety.configured,
            ),
            metrics=metrics,
            hold_at_steps=self.runtime.settings.fault.hold_at_step,
            hold_release_file=self.runtime.settings.fault.hold_release_file,
        )
        with metrics:  # the run's series end with its training
            _, outcome = training.run(hooks)

        self.events.emit(
            record,
            kind="saving",
            step=outcome.steps_done,
            message="saving the model" if config.adapter == "full" else "saving adapter",
        )
        lease.confirm()
        with tempfile.TemporaryDirectory(prefix="bp-adapter-") as tmp:
            training.save_trained(Path(tmp))
            if config.adapter == "full":  # a whole model: loadable on its own
                tokenizer.save_pretrained(tmp)
            durably(self.store.put_dir)(adapter_prefix(run_id), Path(tmp))
            curve = write_loss_curve(outcome.loss_history, Path(tmp) / "loss.png")
            durably(self.store.put_file)(loss_curve_key(run_id), curve)
        record.final_loss = outcome.final_loss
        record.samples_seen = outcome.samples_seen
        record.stopped_early = outcome.stopped_early
        record.best_step = outcome.best_step
        record.tokens_per_second = outcome.tokens_seen / max(outcome.duration_seconds, 1e-9)
        record.peak_memory_bytes = peak_memory_bytes(hardware)
        record.output = adapter_prefix(run_id) + "/"
        lease.confirm()  # the terminal record, saved next, is this worker's to write
        if record.evals:
            return (
                f"done: eval loss {record.best_eval_loss:.4f} at step {record.best_step} "
                f"(base model {record.evals[0].loss:.4f})"
                + (", stopped early" if record.stopped_early else "")
            )
        return f"done: final loss {record.final_loss:.4f}"

    def follow(self, orders: Orders) -> None:
        """Train as a rank other than 0 of a run: the setup rank 0 does, then the steps as it
        leads them (`ranks`); nothing written, nothing published."""
        record = trainer_pb2.RunRecord.FromString(orders.record)
        self.use_threads()
        checkpoints = CheckpointManager(self.store, record.run_id, self.policy)
        source = resolve_model(record.base_model)
        self.prepare(record, checkpoints, source, orders.hardware).training.run()

    def use_threads(self) -> None:
        threads = self.runtime.settings.trainer.threads
        if threads > 0:
            torch.set_num_threads(threads)

    def prepare(
        self,
        record: trainer_pb2.RunRecord,
        checkpoints: CheckpointManager,
        source: ModelSource,
        hardware: Hardware,
        plan: CampaignPlan | None = None,
        start: Adapter | None = None,
    ) -> Prepared:
        """The run set up to take its first step (from its last checkpoint, if any): data,
        model, adapter, optimizer. Every process of a run does this alike, and a failure on any
        of them fails all: rank 0 raises the first one (and records it), the others RunEnded."""
        if self.ranks.world == 1:
            return self._prepare(record, checkpoints, source, hardware, plan, start)
        failed: Exception | None = None
        try:
            prepared = self._prepare(
                record, checkpoints, source, self.ranks.on_own_device(hardware), plan, start
            )
        except Exception as error:
            failed = error
        failure = self.ranks.first_failure(failed)
        if failure is None:
            return prepared
        if self.ranks.speaks:
            raise failure from failed
        raise RunEnded(f"setting up failed: {failure}") from failed

    def _prepare(
        self,
        record: trainer_pb2.RunRecord,
        checkpoints: CheckpointManager,
        source: ModelSource,
        hardware: Hardware,
        plan: CampaignPlan | None,
        start: Adapter | None,
    ) -> Prepared:
        settings = self.runtime.settings
        config = training_config_from_proto(record.config)
        reset_peak_memory(hardware)
        preference = config.method in PREFERENCE_METHODS
        if preference:  # pairs or labelled answers, for trl's losses
            rows = durably(load_preference_rows)(self.store, record.dataset_id, config.method)
        else:
            conversations, eval_conversations = self.training_data(record, config, plan)
        # Planned for the trainer service's GPU: this worker's may be another.
        fit_again_if_moved(
            record,
            source,
            settings.model_cache_dir,
            hardware,
            preference_conversations(rows) if preference else conversations,
        )
        config = training_config_from_proto(record.config)
        check_adapter_supported(config, cuda=hardware.is_cuda, fp8_capable=hardware.fp8)
        model, tokenizer = load_model(
            source,
            settings.model_cache_dir,
            device=hardware.device,
            dtype=hardware.compute_dtype,
            quantize_4bit=config.adapter == "qlora",
        )
        record.device = hardware.device
        record.compute_dtype = hardware.compute_dtype
        record.compute_dtype_reason = hardware.dtype_reason
        resume_from = record.last_checkpoint_step
        if not record.config.gradient_accumulation and not resume_from:
            config.gradient_accumulation = machine_accumulation(config, hardware)
        state = durably(checkpoints.load)(last_checkpoint(record).key) if resume_from else None
        # Steps after the checkpoint are trained again: recorded once, from the checkpoint on.
        record.loss_history[:] = state.loss_history if state else []
        del record.evals[:]
        record.evals.extend(
            trainer_pb2.EvalPoint(step=step, loss=loss)
            for step, loss in (state.evals if state else [])
        )
        options: dict[str, Any] = {
            "resume": state,
            "oom_recovery": not record.config.disable_oom_recovery,
            "oom_drill_step": settings.fault.oom_at_step,
            "gradient_checkpointing": record.memory_plan.gradient_checkpointing,
        }
        training = (
            PreferenceTraining(model, tokenizer, rows, config, **options)
            if preference
            else LoraTraining(
                model,
                tokenizer,
                conversations,
                config,
                eval_conversations=eval_conversations,
                start=start,  # campaigns train sft runs only (campaign_plan checks)
                ranks=self.ranks,
                **options,
            )
        )
        return Prepared(training, config, tokenizer)

    def _report_training(
        self,
        record: trainer_pb2.RunRecord,
        training: LoraTraining,
        config: TrainingConfig,
        source: ModelSource,
        hardware: Hardware,
    ) -> None:
        """What the run trains, how, and what its data lost, in the record and the events."""
        record.trainable_parameters = sum(parameter.numel() for parameter in training.trainable)
        record.batch_size = training.micro_batch_size
        record.gradient_accumulation = training.gradient_accumulation
        record.examples_trained = len(training.dataset.examples)
        record.examples_dropped = training.dataset.dropped
        record.examples_truncated = training.dataset.truncated
        self._report_selection(record, training.selection, config)
        if record.examples_dropped or record.examples_truncated:
            self.events.emit(
                record,
                kind="started",
                message=f"max_length {config.max_length}: {record.examples_truncated} of "
                f"{record.examples_trained + record.examples_dropped} conversations truncated, "
                f"{record.examples_dropped} dropped (raise --max-length to keep them whole)",
            )
        resume_from = record.resumed_from_step
        processes = self.ranks.world
        self.events.emit(
            record,
            kind="started",
            step=training.step,
            message=f"training {source.name} ({config.adapter} {config.method}) for "
            f"{config.steps} steps on {hardware.device} in {hardware.compute_dtype} "
            f"({hardware.dtype_reason})"
            + (f" x {processes} processes" if processes > 1 else "")
            + (f" ({record.budget_reason})" if record.budget_reason else "")
            + (f", resumed from step {resume_from}" if resume_from else "")
            + (f"; {hardware.note}" if hardware.note else "")
            + (f"; {record.memory_plan.reason}" if record.HasField("memory_plan") else ""),
        )

    def _report_selection(
        self, record: trainer_pb2.RunRecord, selection: Selection, config: TrainingConfig
    ) -> None:
        """What the length bounds and the perplexity filter left out, in the record and the
        events (data.selection)."""
        record.examples_left_out = selection.left_out
        if selection.left_out:
            self.events.emit(record, kind="started", message=selection.described(config))

    def training_data(
        self, record: trainer_pb2.RunRecord, config: TrainingConfig, plan: CampaignPlan | None
    ) -> tuple[list[SftRow], list[SftRow]]:
        """The conversations to train on and those to evaluate on: a separate eval dataset, or
        a seeded split of `eval_split` of the data (at least one of each side). A campaign's
        run takes the rows `plan` draws for it first, and the rows it replays."""
        conversations = durably(load_sft_rows)(self.store, record.dataset_id)
        if plan is not None:
            rows = plan.rows_of(record.campaign_run, len(conversations))
            own = [conversations[index] for index in rows]
            conversations = own + self._replayed(record, plan, conversations)
        if record.config.eval_dataset_id:
            return conversations, durably(load_sft_rows)(self.store, record.config.eval_dataset_id)
        return split_for_eval(conversations, config.eval_split, config.seed)

    def _replayed(
        self, record: trainer_pb2.RunRecord, plan: CampaignPlan, own_dataset: list[SftRow]
    ) -> list[SftRow]:
        """The rows of earlier runs that `plan` has this run train on again (none without
        replay), said in the run's events."""
        run = record.campaign_run
        if not plan.replay or run < 2:
            return []
        datasets = {record.dataset_id: own_dataset}
        for dataset_id in {plan.dataset_of(before) for before in range(1, run)} - set(datasets):
            datasets[dataset_id] = durably(load_sft_rows)(self.store, dataset_id)
        sizes = {dataset_id: len(rows) for dataset_id, rows in datasets.items()}
        replayed = [
            datasets[plan.dataset_of(before)][index]
            for before, index in plan.replayed_of(run, sizes)
        ]
        self.events.emit(
            record,
            kind="started",
            message=f"replaying {len(replayed)} rows of "
            + ("run 1" if run == 2 else f"runs 1-{run - 1}")
            + f" ({plan.replay:g} of this run's own)",
        )
        return replayed
