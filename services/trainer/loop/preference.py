"""Preference tuning (DPO, ORPO, SimPO, KTO): trl's losses, our loop.

Why: SFT teaches a model to say what the data says. Preference tuning teaches it which of two
answers is better, from answers someone ranked: the chosen answer gains likelihood against the
rejected one. DPO (Rafailov et al., 2023) measures that against a frozen reference model, `beta`
setting how far it may move; KTO (Ethayarajh et al., 2024) learns from single answers labelled
good or bad; ORPO (Hong et al., 2024) adds an odds-ratio term to the SFT loss and needs no
reference; SimPO (Meng et al., 2024) compares length-normalised log-probabilities against a
margin, with no reference either.

Where the loss is computed: in trl 1.16, by the method's trainer (`trl_method`): DPOTrainer and
KTOTrainer, CPOTrainer with loss_type="simpo" for SimPO, ORPOTrainer. We use such a trainer for
two things only. It prepares the rows (renders them with the model's own chat template,
tokenises, collates: its `data_collator`), and its `compute_loss(model, batch)` is the method's
loss for one micro-batch, logging rewards/margins and rewards/accuracies as it goes. Its
`train()` never runs: `PreferenceTraining._step` is the step of LoraTraining's loop, so a
preference run has SFT's optimizer, schedule, micro-batches, OOM recovery, checkpoints and
hooks, and resumes exactly as an SFT run does.

The reference of DPO and KTO is the model before training: for an adapter, the base with the
adapter disabled (no second copy in memory); for a full fine-tune, a frozen copy. Dropout is off,
as in trl, so the trained model's log-probabilities compare with the reference's.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from backpropagate_api.errors import ConfigError, DatasetEmptyError
from backpropagate_api.training import PREFERENCE_METHODS, TrainingConfig
from backpropagate_services.common.datasets import (
    PAIRED_FORMAT,
    UNPAIRED_FORMAT,
    DatasetRecord,
    PreferenceRow,
    check_method_fits,
)
from backpropagate_services.trainer.adapters.lora import apply_adapter
from backpropagate_services.trainer.data.selection import Selection
from backpropagate_services.trainer.data.templating import TokenizedExample
from backpropagate_services.trainer.loop.checkpoints import TrainingState
from backpropagate_services.trainer.loop.sft import (
    EvalReport,
    LoraTraining,
    OomRecovery,
    StepReport,
    TrainingHooks,
    recompute_activations,
)
from backpropagate_services.trainer.runtime.ranks import ONE_PROCESS

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

    from backpropagate_services.trainer.loop.sft import TrainingOutcome

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # trl's label for tokens outside the answer


def trl_method(method: str) -> tuple[type[Trainer], type[Any], dict[str, Any]]:
    """trl's trainer for `method`, its config class, and the options that make it that method."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig, {"loss_type": ["sigmoid"]}  # the paper's loss
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig, {"loss_type": "kto"}
    from trl.import_utils import TRLExperimentalWarning

    with warnings.catch_warnings():  # ORPO and CPO are in trl.experimental; trl is pinned
        warnings.simplefilter("ignore", TRLExperimentalWarning)
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    if method == "orpo":
        return ORPOTrainer, ORPOConfig, {}
    if method == "simpo":  # CPO with SimPO's loss and no SFT term, as trl documents SimPO
        return CPOTrainer, CPOConfig, {"loss_type": "simpo", "cpo_alpha": 0.0}
    raise ConfigError(f"{method!r} is no preference method.", fields="method")


@dataclass(frozen=True)
class PreferenceDataset:
    """trl's prepared rows (a datasets.Dataset), and what max_length did to the data."""

    examples: Any  # indexable and sized, one trl-tokenised row per example
    dropped: int  # rows whose prompt alone fills max_length: no answer token left to train
    truncated: int  # kept, but an answer cut at max_length

    @classmethod
    def prepared_by(
        cls, objective: Trainer, rows: list[PreferenceRow], config: TrainingConfig
    ) -> PreferenceDataset:
        examples: Any = objective.train_dataset  # a datasets.Dataset
        if "chosen_labels" in examples.column_names:
            # ORPO, SimPO: trl cut the answers at max_length (a cut one lost its closing EOS,
            # which trl always appends) and kept rows left with no answer: those are dropped.
            def answered(row: dict[str, Any]) -> bool:
                return all(
                    any(label != IGNORE_INDEX for label in row[f"{side}_labels"])
                    for side in ("chosen", "rejected")
                )

            kept = examples.filter(answered)
            eos = objective.processing_class.eos_token_id  # type: ignore[union-attr]
            cut = sum(
                row["chosen_input_ids"][-1] != eos or row["rejected_input_ids"][-1] != eos
                for row in kept
            )
            return cls(kept, len(examples) - len(kept), cut)
        # DPO, KTO: trl dropped rows whose prompt fills max_length; its collator cuts the rest.
        # KTO splits every pair into a good and a bad answer.
        expected = len(rows) * (2 if "chosen" in rows[0] and config.method == "kto" else 1)
        answers = [
            examples[name]
            for name in ("chosen_ids", "rejected_ids", "completion_ids")
            if name in examples.column_names
        ]
        longest = [
            len(prompt) + max(map(len, own))
            for prompt, *own in zip(examples["prompt_ids"], *answers, strict=True)
        ]
        cut = sum(length > config.max_length for length in longest)
        return cls(examples, expected - len(examples), cut)


def build_objective(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[PreferenceRow],
    config: TrainingConfig,
) -> Trainer:
    """trl's trainer for `config.method`, its data prepared from `rows`; never trained."""
    import datasets

    datasets.disable_progress_bars()  # a service's log is no terminal
    trainer_class, config_class, options = trl_method(config.method)
    device = next(model.parameters()).device
    extra: dict[str, Any] = {}
    if config.adapter == "full" and config.method in ("dpo", "kto"):
        extra["ref_model"] = copy.deepcopy(model).requires_grad_(False).eval()
    # trl writes to output_dir only from train() and save(), which never run.
    with tempfile.TemporaryDirectory(prefix="bp-trl-") as unused:
        args = config_class(
            output_dir=unused,
            per_device_train_batch_size=config.batch_size,  # KTO's KL term needs > 1
            remove_unused_columns=False,  # CPO's and ORPO's collators want every column
            max_length=config.max_length,
            beta=config.beta,
            seed=config.seed,
            bf16=False,  # no autocast: the model computes in the dtype it was loaded in
            activation_checkpointing=False,  # as in the SFT loop
            use_cpu=device.type == "cpu",  # else the trainer moves the model to a GPU
            report_to="none",
            **options,
        )
        objective = trainer_class(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            **extra,
        )
    peft_config = getattr(model, "peft_config", {})
    if "ref" in peft_config:
        # trl keeps a copy of a passed-in adapter as the reference, for one trained before. Ours
        # is new (lora_B = 0), so the base with the adapter off is that reference, for free.
        model.delete_adapter("ref")  # type: ignore[operator]
    return objective


class PreferenceTraining(LoraTraining):
    """One preference run: LoraTraining's loop, state and OOM recovery, with trl's loss.

    Set up as LoraTraining is (the same adapter, optimizer, schedule, sampler and state, so its
    `state()`, `restore()`, `run()` and OOM recovery serve here unchanged); each optimizer step
    draws `batch_size` rows (pairs, or labelled answers for KTO) and `_step` takes it.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        rows: list[PreferenceRow],
        config: TrainingConfig,
        *,
        resume: TrainingState | None = None,
        oom_recovery: bool = True,
        oom_drill_step: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        """`rows`: as `load_preference_rows` gives them. `oom_drill_step` and
        `gradient_checkpointing`: as LoraTraining's."""
        self.config = config.validate()
        if not rows:
            raise DatasetEmptyError("No preference rows to train on.")
        check_method_fits(config.method, UNPAIRED_FORMAT if "label" in rows[0] else PAIRED_FORMAT)
        check_preference_config(config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.oom_recovery = oom_recovery
        self.oom_drill_step = oom_drill_step
        # One process: the config refuses a preference method on several (check_processes).
        self.ranks, self.sharded = ONE_PROCESS, False

        torch.manual_seed(config.seed)  # adapter init
        self.model = apply_adapter(model, config)
        if gradient_checkpointing:
            recompute_activations(self.model)
        self.device = next(self.model.parameters()).device
        self.objective = build_objective(self.model, tokenizer, rows, config)
        self.dataset = PreferenceDataset.prepared_by(self.objective, rows, config)
        if not len(self.dataset.examples):
            raise DatasetEmptyError(
                f"None of the {len(rows)} rows has an answer token within "
                f"max_length={config.max_length}: every prompt fills it.",
                hint="Raise --max-length, or shorten the prompts.",
            )
        if self.dataset.dropped or self.dataset.truncated:
            log.warning(
                "max_length %d: %d examples dropped (prompt fills it), %d truncated (an answer "
                "cut short)",
                config.max_length,
                self.dataset.dropped,
                self.dataset.truncated,
            )
        self.selection = Selection.everything(len(self.dataset.examples))  # pairs as given
        self.packing = False  # trl's collators pad pairs; SFT rows are what packing is for
        self.start_optimisation()
        # Eval loss is SFT's token loss: a preference run has no eval set.
        self.eval_examples: list[TokenizedExample] = []
        # The last step's, from trl's metrics: chosen minus rejected reward, and the share of
        # rows whose chosen answer is rewarded more (None where trl logs none: KTO's accuracy).
        self.reward_margin: float | None = None
        self.reward_accuracy: float | None = None
        if resume is not None:
            self.restore(resume)

    def run(self, hooks: TrainingHooks | None = None) -> tuple[PeftModel, TrainingOutcome]:
        """LoraTraining's loop; each step's report carries that step's reward margin and
        accuracy."""
        return super().run(RewardReporting(hooks or TrainingHooks()))

    def _step(self, step: int, indices: list[int]) -> tuple[float, int, float]:
        """One optimizer step over the rows `indices`: (mean loss, answer tokens, learning rate)."""
        rows = self._rows(indices)
        taken_metrics(self.objective)  # nothing left over from an attempt that ran out of memory
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, answer_tokens = 0.0, 0
        rewards = WeightedMeans()
        for start in range(0, len(rows), self.micro_batch_size):
            part = rows[start : start + self.micro_batch_size]
            batch = {
                key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                for key, value in self.objective.data_collator(part).items()  # type: ignore[misc]
            }
            # The method's loss (see the module docstring): a mean over the micro-batch's rows,
            # weighted by its share of the step so that any split gives the step's mean.
            loss = self.objective.compute_loss(self.model, batch)
            assert isinstance(loss, torch.Tensor)
            loss = loss * len(part) / len(rows)
            if step == self.oom_drill_step:
                self.oom_drill_step = None  # once
                raise torch.OutOfMemoryError(f"Fault drill: out of memory at step {step}.")
            loss.backward()
            step_loss += loss.item()
            answer_tokens += count_answer_tokens(batch)
            rewards.add(taken_metrics(self.objective), weight=len(part))
        torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        learning_rate = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.reward_margin = rewards.mean("rewards/margins")
        self.reward_accuracy = rewards.mean("rewards/accuracies")
        return step_loss, answer_tokens, learning_rate

    def _rows(self, indices: list[int]) -> list[dict[str, Any]]:
        rows = [self.dataset.examples[index] for index in indices]
        if self.config.method != "kto":
            return rows
        # KTO's KL term scores each prompt with another row's answer: this step's answers, each
        # moved one row on (trl does it within a batch, but its batches are not our steps').
        answers = [row["completion_ids"] for row in rows]
        return [{**row, "KL_completion_ids": answers[index - 1]} for index, row in enumerate(rows)]


def check_method(config: TrainingConfig, dataset: DatasetRecord, eval_dataset_id: str = "") -> None:
    """At submit, before anything is queued: the dataset fits the method, and a preference run
    asks for nothing it cannot do."""
    check_method_fits(config.method, dataset.format, dataset.dataset_id)
    if config.method in PREFERENCE_METHODS:
        check_preference_config(config, eval_dataset_id)


def check_preference_config(config: TrainingConfig, eval_dataset_id: str = "") -> None:
    """What a preference run cannot do: ConfigError."""
    if config.method == "kto" and config.batch_size < 2:
        raise ConfigError(
            "kto needs batch_size >= 2: its KL term scores each prompt with another row's answer.",
            hint="Raise --batch-size.",
            fields="batch_size",
        )
    if config.eval_split or config.early_stopping_patience or eval_dataset_id:
        raise ConfigError(
            "Eval loss and early stopping are for sft runs: a preference run reports its reward "
            "margin and accuracy instead.",
            hint="Leave out --eval-split, --eval-data and --early-stopping-patience for "
            f"method {config.method}.",
            fields="eval_split,eval_dataset_id,early_stopping_patience",
        )


def taken_metrics(objective: Trainer) -> dict[str, float]:
    """The metrics trl logged since the last call, taken out of its buffer.

    trl's trainers buffer per-batch metrics for `log()`, which never runs here: DPO and KTO in
    `_metrics["train"]`, CPO and ORPO in `_stored_metrics["train"]`, lists of values per key.
    """
    if hasattr(objective, "_stored_metrics"):
        logged = objective._stored_metrics["train"]
    else:
        logged = objective._metrics["train"]  # type: ignore[attr-defined]
    taken = {key: sum(values) / len(values) for key, values in logged.items() if values}
    logged.clear()
    return taken


def count_answer_tokens(batch: dict[str, Any]) -> int:
    """Tokens of the chosen and rejected answers (or KTO's answers) in a collated batch."""
    if "completion_mask" in batch:  # DPO, KTO
        return int(batch["completion_mask"].sum())
    return sum(
        int((batch[f"{side}_labels"] != IGNORE_INDEX).sum()) for side in ("chosen", "rejected")
    )


class WeightedMeans:
    """Per-key means of values added with weights; a key never added has no mean (None)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, values: dict[str, float], weight: float) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * weight
            self.weights[key] = self.weights.get(key, 0.0) + weight

    def mean(self, key: str) -> float | None:
        return self.sums[key] / self.weights[key] if key in self.weights else None


class RewardReporting(TrainingHooks):
    """Passes every hook on, adding the step's reward margin and accuracy to its report."""

    def __init__(self, hooks: TrainingHooks) -> None:
        self.hooks = hooks

    def before_step(self, step: int, training: LoraTraining) -> None:
        self.hooks.before_step(step, training)

    def after_step(self, report: StepReport, training: LoraTraining) -> None:
        assert isinstance(training, PreferenceTraining)
        self.hooks.after_step(
            replace(
                report,
                reward_margin=training.reward_margin,
                reward_accuracy=training.reward_accuracy,
            ),
            training,
        )

    def on_oom_recovery(self, recovery: OomRecovery) -> None:
        self.hooks.on_oom_recovery(recovery)

    def after_eval(self, report: EvalReport, training: LoraTraining) -> None:
        self.hooks.after_eval(report, training)
