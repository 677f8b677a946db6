"""What the SDK returns: plain dataclasses, so users never handle protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from backpropagate_api.statuses import status_name
from backpropagate_api.v1 import export_pb2, trainer_pb2


@dataclass(frozen=True)
class MergeResult:
    """One run of a campaign, merged: see the MergePoint message."""

    run: int
    run_id: str
    task: int
    loss: float
    merge_weight: float
    change_norm: float
    samples: int
    dataset_id: str


@dataclass(frozen=True)
class RunResult:
    run_id: str
    status: str
    base_model: str
    dataset_id: str
    steps: int
    final_loss: float
    loss_history: list[float] = field(default_factory=list)
    output: str = ""  # store prefix of the adapter
    duration_seconds: float = 0.0
    samples_seen: int = 0
    attempts: int = 0  # times a worker started it (more than 1: it was resumed)
    worker: str = ""  # the worker (queue consumer, named after its host or pod) of the last one
    processes: int = 1  # that trained the last attempt together (nproc_per_node, or across nodes)
    resumed_from_step: int = 0
    last_checkpoint_step: int = 0
    checkpoint_steps: list[int] = field(default_factory=list)
    examples_trained: int = 0
    examples_truncated: int = 0  # kept but cut at max_length
    examples_dropped: int = 0  # nothing left to train within max_length
    examples_left_out: int = 0  # by length bounds and the perplexity filter
    adapter_scale: float = 1.0  # the trained update kept at this scale (below 1: WiSE-FT)
    method: str = "sft"
    adapter: str = "lora"
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss); step 0: base
    best_eval_loss: float = 0.0  # the weights saved are this step's (0.0: no eval set)
    best_step: int = 0
    stopped_early: bool = False
    budget_reason: str = ""  # why this many steps, when the trainer chose
    device: str = ""
    compute_dtype: str = ""
    compute_dtype_reason: str = ""  # a setting, the GPU, or the CPU's measured speeds
    memory_plan: str = ""  # on a GPU: how the trainer fitted the run to it, and why
    trainable_parameters: int = 0
    peak_memory_bytes: int = 0
    tokens_per_second: float = 0.0
    reward_margin: float = 0.0  # preference methods: chosen minus rejected reward, last steps
    reward_accuracy: float = 0.0
    # A campaign (multi_run): its merge mode, planned runs, child runs and merge timeline.
    merge: str = ""
    replay: float = 0.0  # a campaign's rehearsal share
    runs_planned: int = 0
    run_ids: list[str] = field(default_factory=list)
    timeline: list[MergeResult] = field(default_factory=list)
    campaign_id: str = ""  # a campaign's run: the campaign, and its place in it
    campaign_run: int = 0

    @property
    def output_path(self) -> str:
        """Where the adapter was saved (the product's TrainingRun name for `output`)."""
        return self.output

    @classmethod
    def from_proto(cls, record: trainer_pb2.RunRecord) -> RunResult:
        return cls(
            run_id=record.run_id,
            status=status_name(record.status),
            base_model=record.base_model,
            dataset_id=record.dataset_id,
            steps=record.steps,
            final_loss=record.final_loss,
            loss_history=list(record.loss_history),
            output=record.output,
            duration_seconds=record.duration_seconds,
            samples_seen=record.samples_seen,
            attempts=record.attempts,
            worker=record.worker,
            processes=record.world_size or 1,
            resumed_from_step=record.resumed_from_step,
            last_checkpoint_step=record.last_checkpoint_step,
            checkpoint_steps=[checkpoint.step for checkpoint in record.checkpoints],
            examples_trained=record.examples_trained,
            examples_truncated=record.examples_truncated,
            examples_dropped=record.examples_dropped,
            examples_left_out=record.examples_left_out,
            adapter_scale=record.config.adapter_scale or 1.0,
            method=record.config.method or "sft",
            adapter=record.config.adapter or "lora",
            evals=[(point.step, point.loss) for point in record.evals],
            best_eval_loss=record.best_eval_loss,
            best_step=record.best_step,
            stopped_early=record.stopped_early,
            budget_reason=record.budget_reason,
            device=record.device,
            compute_dtype=record.compute_dtype,
            compute_dtype_reason=record.compute_dtype_reason,
            memory_plan=record.memory_plan.reason,
            trainable_parameters=record.trainable_parameters,
            peak_memory_bytes=record.peak_memory_bytes,
            tokens_per_second=record.tokens_per_second,
            reward_margin=record.reward_margin,
            reward_accuracy=record.reward_accuracy,
            merge=record.campaign.config.merge,
            replay=record.campaign.config.replay,
            runs_planned=record.campaign.config.runs,
            run_ids=list(record.campaign.run_ids),
            timeline=[
                MergeResult(
                    **MessageToDict(
                        point,
                        preserving_proto_field_name=True,
                        always_print_fields_with_no_presence=True,
                    )
                )
                for point in record.campaign.timeline
            ],
            campaign_id=record.campaign_id,
            campaign_run=record.campaign_run,
        )


@dataclass(frozen=True)
class ExportResult:
    export_id: str
    run_id: str
    format: str
    quantization: str
    path: Path  # the downloaded main file (an hf export: its directory) on this machine
    artifact_key: str
    size_bytes: int
    sha256: str
    top1_agreement: float
    mean_kl: float
    smoke_prompt: str
    smoke_answer: str
    duration_seconds: float
    perplexity_reference: float = 0.0  # the trained torch model's, on the reference replies
    perplexity_gguf: float = 0.0
    merge_error: float = 0.0  # merged vs base + adapter logits, relative to the largest
    verification_warning: str = ""  # a low-bit file that passed below the high-bit gate
    record: dict[str, object] = field(default_factory=dict)  # the export record, proto names
    files: list[Path] = field(default_factory=list)  # every downloaded file, main one first

    @classmethod
    def from_proto(
        cls, result: export_pb2.ExportResult, path: Path, files: list[Path] | None = None
    ) -> ExportResult:
        return cls(
            export_id=result.export_id,
            run_id=result.run_id,
            format=result.format,
            quantization=result.quantization,
            path=path,
            artifact_key=result.artifact_key,
            size_bytes=result.size_bytes,
            sha256=result.sha256,
            top1_agreement=result.verification.top1_agreement,
            mean_kl=result.verification.mean_kl,
            smoke_prompt=result.smoke_prompt,
            smoke_answer=result.smoke_answer,
            duration_seconds=result.duration_seconds,
            perplexity_reference=result.verification.perplexity_reference,
            perplexity_gguf=result.verification.perplexity_gguf,
            merge_error=result.verification.merge_error,
            verification_warning=result.verification.warning,
            record=MessageToDict(result, preserving_proto_field_name=True),
            files=files or [path],
        )


@dataclass(frozen=True)
class MemoryEstimateResult:
    """A run's predicted peak memory on the machine that would train it, in bytes."""

    device: str  # "cuda:0" or "cpu"
    total_bytes: int  # the predicted peak
    weights_bytes: int  # the base model
    trainable_bytes: int  # adapter (or full) weights, gradients and AdamW state
    activations_bytes: int  # the largest micro-batch's forward and backward
    overhead_bytes: int  # the CUDA context, or the Python process
    available_bytes: int  # free VRAM (CUDA) or host memory now
    fits: bool
    parameters: int  # of the base model
    trainable_parameters: int
    plan: str = ""  # on a GPU: how the run would be fitted to it (adapter, micro-batch), and why
    # The estimate as JSON has it, proto field names, every field (False and 0 too).
    record: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, estimate: trainer_pb2.MemoryEstimate) -> MemoryEstimateResult:
        return cls(
            device=estimate.device,
            total_bytes=estimate.total_bytes,
            weights_bytes=estimate.weights_bytes,
            trainable_bytes=estimate.trainable_bytes,
            activations_bytes=estimate.activations_bytes,
            overhead_bytes=estimate.overhead_bytes,
            available_bytes=estimate.available_bytes,
            fits=estimate.fits,
            parameters=estimate.parameters,
            trainable_parameters=estimate.trainable_parameters,
            plan=estimate.plan.reason,
            record=MessageToDict(
                estimate,
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            ),
        )
