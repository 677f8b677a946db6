"""A campaign (multi-run) job: train a run on each new slice of data, each going on from the
last, and merge every run's adapter into the campaign's (`slao`).

The campaign is one job and one run record; its runs are child records that checkpoint like any
run. After each run the merged adapter and the merge's state (`ContinualMerge.state`, with the
timeline) are written to the store, state last: that write is the campaign's commit point. A
redelivered or resumed campaign reads it and goes on with the first run not merged: a run that
had finished is merged from its stored adapter, one that had not goes on from its last
checkpoint. Runs are seeded by their number and their rows drawn by `campaign_plan`, so a
resumed campaign ends with the merged adapter an uninterrupted one would have.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from google.protobuf.json_format import MessageToDict, ParseDict

from backpropagate_api.errors import JobCancelledError, NotFoundError
from backpropagate_api.grpc_errors import detail_to_error
from backpropagate_api.ids import new_id
from backpropagate_api.layout import adapter_prefix, loss_curve_key, merge_state_key
from backpropagate_api.layout import run_record_key as record_key
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.jobs import Lease, StoppedForLater, durably, run_recorded
from backpropagate_services.common.queue import Job
from backpropagate_services.common.records import load_record
from backpropagate_services.common.store.base import ArtifactStore
from backpropagate_services.trainer.adapters.factors import read_adapter_dir, write_adapter_dir
from backpropagate_services.trainer.loop.plots import write_loss_curve
from backpropagate_services.trainer.multirun.campaign_plan import CampaignPlan
from backpropagate_services.trainer.multirun.slao import ContinualMerge
from backpropagate_services.trainer.planning.config import training_config_from_proto
from backpropagate_services.trainer.runtime.run_hooks import save_while_held

if TYPE_CHECKING:
    from backpropagate_services.trainer.runtime.worker import TrainWorker


def read_merge_state(store: ArtifactStore, campaign_id: str) -> dict[str, Any] | None:
    """The campaign's merge state and timeline as last committed; None before its first merge."""
    key = merge_state_key(campaign_id)
    if not store.exists(key):
        return None
    return torch.load(io.BytesIO(store.get_bytes(key)), weights_only=True)


def finished_merge(store: ArtifactStore, campaign_id: str) -> ContinualMerge:
    """The merge of a finished campaign, for a campaign that continues from it."""
    state = read_merge_state(store, campaign_id)
    if state is None:
        raise NotFoundError(
            f"Campaign {campaign_id} has merged no run yet.",
            hint="Continue from a campaign that finished (backprop runs list).",
            run_id=campaign_id,
        )
    return ContinualMerge.restore(state["merge"])


class CampaignRunner:
    """One attempt at a campaign, by `worker` under `lease`."""

    def __init__(
        self, worker: TrainWorker, record: trainer_pb2.RunRecord, job: Job, lease: Lease
    ) -> None:
        self.worker = worker
        self.store = worker.store
        self.record = record
        self.job = job
        self.lease = lease
        self.seed = training_config_from_proto(record.config).seed
        self.plan = CampaignPlan.of(record.campaign, self.seed)

    def run(self) -> str:
        record, campaign = self.record, self.record.campaign
        merge = self._merge_so_far()
        record.status = common_pb2.JOB_STATUS_RUNNING
        record.attempts += 1
        record.job_id = self.job.job_id
        record.ClearField("error")
        save_while_held(self.lease, self.store, record)
        done = len(campaign.timeline)
        self.worker.events.emit(
            record,
            kind="started",
            step=done * record.config.steps,
            message=f"campaign of {campaign.config.runs} runs, merge {campaign.config.merge}"
            + (f", going on after run {done}" if done else ""),
        )
        for run in range(done + 1, campaign.config.runs + 1):
            child = self._child(run)
            if child.status != common_pb2.JOB_STATUS_SUCCEEDED:
                self._train(child, merge)
            self._merge_run(merge, child)
        record.output = adapter_prefix(record.run_id) + "/"
        last = campaign.timeline[-1]
        return (
            f"done: {campaign.config.runs} runs merged ({campaign.config.merge}), last run's "
            f"loss {last.loss:.4f}, merged update moved {last.change_norm:.3g} by the last"
        )

    def _train(self, child: trainer_pb2.RunRecord, merge: ContinualMerge) -> None:
        """Train the run from where the merge says it starts; it ends the campaign unless it
        succeeds."""
        start = merge.start()
        message = run_recorded(
            child, lambda: self.worker.train(child, self.job, self.lease, self.plan, start)
        )
        self.worker.finish(child, message)
        _raise_unless_succeeded(child)

    def _merge_so_far(self) -> ContinualMerge:
        """The merge as last committed (a resumed campaign), or a new one, or the one of the
        campaign this one continues."""
        record, campaign = self.record, self.record.campaign
        state = read_merge_state(self.store, record.run_id)
        if state is not None:
            del campaign.timeline[:]
            campaign.timeline.extend(
                ParseDict(point, trainer_pb2.MergePoint()) for point in state["timeline"]
            )
            return ContinualMerge.restore(state["merge"])
        del campaign.timeline[:]
        if campaign.config.continue_from:
            return durably(finished_merge)(self.store, campaign.config.continue_from)
        return ContinualMerge(campaign.config.merge)

    def _child(self, run: int) -> trainer_pb2.RunRecord:
        """Run `run`'s record: the one started before, or a new one, saved before it trains."""
        record, campaign = self.record, self.record.campaign
        if run <= len(campaign.run_ids):
            return durably(load_record)(
                self.store, record_key(campaign.run_ids[run - 1]), trainer_pb2.RunRecord, "run"
            )
        config = trainer_pb2.TrainConfig()
        config.CopyFrom(record.config)
        config.seed = self.seed + run - 1
        child = trainer_pb2.RunRecord(
            run_id=new_id("run"),
            status=common_pb2.JOB_STATUS_QUEUED,
            dataset_id=self.plan.dataset_of(run),
            base_model=record.base_model,
            steps=config.steps,
            created_at=time.time(),
            config=config,
            campaign_id=record.run_id,
            campaign_run=run,
        )
        if record.HasField("memory_plan"):  # the campaign's plan: its config is that plan's
            child.memory_plan.CopyFrom(record.memory_plan)
        save_while_held(self.lease, self.store, child)
        campaign.run_ids.append(child.run_id)
        save_while_held(self.lease, self.store, record)
        return child

    def _merge_run(self, merge: ContinualMerge, child: trainer_pb2.RunRecord) -> None:
        """Merge the finished `child`'s stored adapter; write the merged adapter, then commit."""
        record, campaign = self.record, self.record.campaign
        with tempfile.TemporaryDirectory(prefix="bp-campaign-") as tmp:
            trained = durably(self.store.get_dir)(adapter_prefix(child.run_id), Path(tmp) / "run")
            step = merge.add(read_adapter_dir(trained))
            merged = write_adapter_dir(merge.merged, trained, Path(tmp) / "merged")
            durably(self.store.put_dir)(adapter_prefix(record.run_id), merged)
            campaign.timeline.append(
                trainer_pb2.MergePoint(
                    run=child.campaign_run,
                    run_id=child.run_id,
                    task=step.task,
                    loss=child.final_loss,
                    merge_weight=step.weight,
                    change_norm=step.change_norm,
                    samples=child.examples_trained,
                    dataset_id=child.dataset_id,
                )
            )
            self._commit(merge)
            record.loss_history.extend(child.loss_history)
            record.final_loss = child.final_loss
            record.samples_seen += child.samples_seen
            record.examples_trained += child.examples_trained
            curve = write_loss_curve(list(record.loss_history), Path(tmp) / "loss.png")
            durably(self.store.put_file)(loss_curve_key(record.run_id), curve)
        save_while_held(self.lease, self.store, record)
        point = campaign.timeline[-1]
        self.worker.events.emit(
            record,
            kind="merged",
            step=point.run * record.config.steps,
            loss=point.loss,
            merge=point,
            message=f"run {point.run}/{campaign.config.runs} merged ({campaign.config.merge}): "
            f"weight {point.merge_weight:.3f}, update moved {point.change_norm:.3g}",
        )

    def _commit(self, merge: ContinualMerge) -> None:
        """Write the merge state with the timeline: from here on, the run counts as merged."""
        self.lease.confirm()
        buffer = io.BytesIO()
        timeline = [
            MessageToDict(point, preserving_proto_field_name=True)
            for point in self.record.campaign.timeline
        ]
        torch.save({"merge": merge.state(), "timeline": timeline}, buffer)
        durably(self.store.put_bytes)(merge_state_key(self.record.run_id), buffer.getvalue())


def _raise_unless_succeeded(child: trainer_pb2.RunRecord) -> None:
    """A run that did not finish ends its campaign the same way (resumable where it is)."""
    where = f"run {child.campaign_run} ({child.run_id})"
    if child.status == common_pb2.JOB_STATUS_INTERRUPTED:
        raise StoppedForLater(f"{where} was interrupted after a checkpoint")
    if child.status == common_pb2.JOB_STATUS_CANCELLED:
        raise JobCancelledError(f"{where} was cancelled.")
    if child.status != common_pb2.JOB_STATUS_SUCCEEDED:
        raise detail_to_error(child.error)
