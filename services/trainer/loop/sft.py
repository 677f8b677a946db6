"""The LoRA SFT loop: setup, the step, the report; resumable from a checkpointed state.

The loss is computed in `summed_token_loss`, in plain sight: cross-entropy of the
logits at position t against the token at t + 1, over assistant tokens only (see `templating`).
Logits are projected only at those positions (`logits_to_keep` with a boolean mask): the
full-vocabulary fp32 logits of every prompt and padding position would otherwise dominate memory
and a fifth of the compute.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from backpropagate_api.errors import (
    DatasetEmptyError,
    GpuOutOfMemoryError,
    JobCancelledError,
)
from backpropagate_api.training import TrainingConfig
from backpropagate_services.trainer.adapters.factors import as_parameters
from backpropagate_services.trainer.adapters.lora import apply_adapter
from backpropagate_services.trainer.data.packing import Batch, packed_batches, packing_works
from backpropagate_services.trainer.data.selection import select_examples
from backpropagate_services.trainer.data.templating import (
    IGNORE_INDEX,
    SftRow,
    TokenizedDataset,
    TokenizedExample,
    tokenize_conversations,
)
from backpropagate_services.trainer.loop.checkpoints import TrainingState
from backpropagate_services.trainer.loop.sharding import (
    evened,
    full_optimizer_state,
    full_weights,
    load_full_optimizer_state,
    load_full_weights,
    shard,
)
from backpropagate_services.trainer.multirun.slao import Adapter
from backpropagate_services.trainer.runtime.ranks import ONE_PROCESS, Ranks

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    step: int  # 1-based count of optimizer steps done
    total_steps: int
    loss: float  # mean over this step's trained tokens
    learning_rate: float  # the rate this step was taken with
    tokens_per_second: float  # trained (assistant) tokens per second of this step
    eta_seconds: float
    samples_seen: int
    # Preference methods (see `preference`): chosen minus rejected reward, and the share of rows
    # whose chosen answer is rewarded more, as trl logs them for this step; None for SFT.
    reward_margin: float | None = None
    reward_accuracy: float | None = None


@dataclass(frozen=True)
class EvalReport:
    """The mean token loss on the eval set after `step` optimizer steps (0: the base model)."""

    step: int
    loss: float
    best_loss: float  # the lowest after a step so far (the base model's is no candidate)
    best_step: int
    improved: bool


@dataclass(frozen=True)
class OomRecovery:
    """The micro-batch was halved after an out-of-memory error; the effective batch is kept."""

    step: int  # the step that is taken again
    micro_batch_size: int
    gradient_accumulation: int
    recoveries: int  # how many times so far in this run


@dataclass(frozen=True)
class TrainingOutcome:
    loss_history: list[float]
    final_loss: float
    samples_seen: int
    tokens_seen: int  # trained (assistant) tokens, the ones the loss was computed on
    duration_seconds: float
    examples_trained: int
    examples_dropped: int  # conversations with no assistant token left within max_length
    examples_truncated: int  # kept, but cut at max_length
    examples_left_out: int  # by the length bounds and the perplexity filter (data.selection)
    steps_done: int  # fewer than config.steps when early stopping ended the run
    evals: list[tuple[int, float]]  # (step, eval loss); the first is the base model's (step 0)
    best_step: int  # the step whose weights the model holds now: the best by eval loss, or last
    stopped_early: bool


MAX_OOM_RECOVERIES = 3


class TrainingHooks:
    """What the service around the loop does between steps; every default does nothing.

    `before_step` may block (a safety pause) or raise to stop the run (cancelled, lease lost,
    shutting down); both hooks may call `training.checkpoint_state()` to write a checkpoint.
    """

    def before_step(self, step: int, training: LoraTraining) -> None:
        """Called before optimizer step `step` (1-based) is taken."""

    def after_step(self, report: StepReport, training: LoraTraining) -> None:
        """Called once the step is done and counted."""

    def on_oom_recovery(self, recovery: OomRecovery) -> None:
        """Called after the micro-batch was halved, before the step is taken again."""

    def after_eval(self, report: EvalReport, training: LoraTraining) -> None:
        """Called after each evaluation on the eval set (the first one before step 1)."""


class CallbackHooks(TrainingHooks):
    """A per-step callback and a cancellation check: all a plain caller needs."""

    def __init__(
        self,
        on_step: Callable[[StepReport], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.on_step = on_step
        self.should_stop = should_stop

    def before_step(self, step: int, training: LoraTraining) -> None:
        if self.should_stop is not None and self.should_stop():
            raise JobCancelledError(f"Cancelled before step {step} of {training.config.steps}.")

    def after_step(self, report: StepReport, training: LoraTraining) -> None:
        if self.on_step is not None:
            self.on_step(report)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OOM, and the host's: torch's CPU allocator raises a plain RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError | MemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def recompute_activations(model: PreTrainedModel | PeftModel) -> None:
    """Gradient checkpointing: each decoder layer keeps only its input and computes the rest
    again in the backward pass, about a third more compute for a fraction of the activations; a
    run's memory plan turns it on only where the run fits no other way (`memory_plan`).
    Non-reentrant, so frozen inputs need no gradient hook, and LoRA dropout draws the same masks
    again (torch's checkpoint restores the RNG state the layer started from)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


class LoraTraining:
    """One LoRA SFT run, resumable: set up from scratch or from a checkpointed `TrainingState`.

    Each optimizer step draws `batch_size` conversations and runs them as micro-batches of
    `micro_batch_size` (gradient accumulation); the loss is the mean over all the step's trained
    tokens, whatever the split. On an out-of-memory error the micro-batch is halved and the same
    step taken again from the same state, so the effective batch and the data order stay.

    Trained by several processes (`ranks`), each takes its share of the step's conversations,
    packs it into micro-batches of its own and sums its gradient into the step's (`ranks`): the
    same loss and update as one process, `batch_size` still the optimizer's batch. A full
    fine-tune is sharded over them (`sharding`); an adapter is whole in each.
    """

    ranks: Ranks
    sharded: bool
    whole_weights: dict[str, torch.Tensor] | None = None  # a sharded run's, once it has ended

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        conversations: Sequence[SftRow],
        config: TrainingConfig,
        *,
        resume: TrainingState | None = None,
        oom_recovery: bool = True,
        oom_drill_step: int | None = None,
        eval_conversations: Sequence[SftRow] = (),
        start: Adapter | None = None,
        packing: bool = True,
        gradient_checkpointing: bool = False,
        ranks: Ranks = ONE_PROCESS,
    ) -> None:
        """`eval_conversations`: held out; their mean token loss is measured every
        `eval_every` steps, the best weights by it are the ones the run ends with, and early
        stopping watches it. `start`: LoRA factors to start from instead of LoRA's
        initialisation (a campaign's run goes on from the last: see `slao`). `packing`:
        several conversations a row where the model honours position resets (`packing`);
        False pads each conversation's row to the micro-batch's longest.
        `gradient_checkpointing`: see `recompute_activations`. `ranks`: the processes training
        this run together, each constructing it alike (`ranks`).
        `oom_drill_step`: a fault drill, raising a real out-of-memory
        error inside that step (once) so the recovery path runs for real."""
        self.config = config.validate()
        self.ranks = ranks
        self.sharded = ranks.world > 1 and config.adapter == "full"
        self.dataset = tokenize_conversations(conversations, tokenizer, config.max_length)
        self.eval_examples = tokenize_conversations(
            eval_conversations, tokenizer, config.max_length
        ).examples
        if not self.dataset.examples:
            raise DatasetEmptyError(
                f"None of the {len(conversations)} conversations has an assistant token within "
                f"max_length={config.max_length}.",
                hint="Raise --max-length, or check that the rows have assistant turns.",
            )
        if self.dataset.dropped or self.dataset.truncated:
            log.warning(
                "max_length %d: %d conversations dropped (cut off before any assistant token), "
                "%d truncated (their ends not trained)",
                config.max_length,
                self.dataset.dropped,
                self.dataset.truncated,
            )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # A sharded pass cannot be taken back: its collectives are under way on the others.
        self.oom_recovery = oom_recovery and not self.sharded
        self.oom_drill_step = oom_drill_step
        self._select_examples(model)
        # Logits of a packed row match those of its parts to ~1e-5 in fp32; bf16 rounds more.
        tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 1e-1
        self.packing = packing and packing_works(model, tolerance)
        if packing and not self.packing:
            log.warning("this model's attention ignores position resets: rows are padded")

        torch.manual_seed(config.seed)  # LoRA init and dropout; data order has its own Random
        self.model = apply_adapter(model, config)
        if gradient_checkpointing:
            recompute_activations(self.model)
        if start is not None:
            parameters = dict(self.model.named_parameters())
            self.load_trained_weights(as_parameters(start, parameters))
        if self.sharded:
            shard(self.model)
        self.device = next(self.model.parameters()).device
        self.start_optimisation()
        if resume is not None:
            self.restore(resume)
        ranks.own_dropout(config.seed, self.step)

    @torch.no_grad()
    def scale_update(self, scale: float) -> None:
        """Scale the trained update B @ A by `scale` (scaling lora_B does it): below 1 the
        weights move back along the line to the base model's, as WiSE-FT interpolates."""
        if scale == 1:
            return
        for name, parameter in self.model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale)

    def _select_examples(self, base_model: PreTrainedModel) -> None:
        """Length bounds, perplexity filter and curriculum (data.selection), scored with the
        base model before the adapter goes on; the examples kept, in first-pass order."""
        self.selection = select_examples(
            self.dataset.examples,
            self.config,
            lambda examples: example_perplexities(base_model, examples, self.pad_id),
        )
        if not self.selection.kept:
            raise DatasetEmptyError(
                f"The length bounds and perplexity filter leave none of the "
                f"{len(self.dataset.examples)} conversations to train on.",
                hint="Loosen --min-tokens, --max-tokens or --perplexity-drop.",
            )
        examples = self.dataset.examples
        self.dataset = TokenizedDataset(
            [examples[i] for i in self.selection.kept], self.dataset.dropped
        )
        if self.selection.left_out:
            log.info("%s", self.selection.described(self.config))

    def start_optimisation(self) -> None:
        """Optimizer, schedule, data order and counters at step 0, for `self.model`'s
        trainable weights over `self.dataset`'s examples."""
        config = self.config
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: learning_rate_factor(
                step, config.warmup_steps, config.steps, config.lr_scheduler
            ),
        )
        self.batches = BatchSampler(
            len(self.dataset.examples),
            config.batch_size,
            config.seed,
            first_pass_in_order=self.selection.ordered,
        )
        self.step = 0
        self.loss_history: list[float] = []
        self.tokens_seen = 0
        self.micro_batch_size = math.ceil(config.batch_size / config.gradient_accumulation)
        self.oom_recoveries = 0
        self.evals: list[tuple[int, float]] = []
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.evals_since_best = 0

    @property
    def eval_interval(self) -> int:
        return self.config.eval_every or max(1, self.config.steps // 10)

    @property
    def best_eval(self) -> tuple[int, float] | None:
        """(step, loss) of the best eval after a step; the base model's is no candidate."""
        trained = [point for point in self.evals if point[0] > 0]
        return min(trained, key=lambda point: (point[1], -point[0])) if trained else None

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The weights that train (LoRA's, or all of them for a full fine-tune), copied; whole
        where they are sharded (every process gathers them)."""
        if self.sharded:
            return full_weights(self.model)
        return {
            name: parameter.detach().cpu().clone()
            for name, parameter in self.model.named_parameters()
            if parameter.requires_grad
        }

    def load_trained_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if self.sharded:
            load_full_weights(self.model, weights)
            return
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                parameters[name].copy_(tensor)

    @property
    def gradient_accumulation(self) -> int:
        """Micro-batches each process runs per step (its share of the batch, split)."""
        share = math.ceil(self.config.batch_size / self.ranks.world)
        return math.ceil(share / self.micro_batch_size)

    def state(self) -> TrainingState:
        """Everything needed to go on from here, copied (training may go on meanwhile)."""
        return TrainingState(
            step=self.step,
            loss_history=list(self.loss_history),
            tokens_seen=self.tokens_seen,
            micro_batch_size=self.micro_batch_size,
            adapter=self.trained_weights(),
            optimizer=full_optimizer_state(self.model, self.optimizer, self.trainable_names)
            if self.sharded
            else copy.deepcopy(self.optimizer.state_dict()),
            scheduler=self.scheduler.state_dict(),
            data_order=self.batches.state(),
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            evals=list(self.evals),
            best_weights=self.best_weights,  # replaced, never changed in place: no copy needed
            evals_since_best=self.evals_since_best,
        )

    def checkpoint_state(self) -> TrainingState:
        """`state()` for a checkpoint rank 0 writes: the other processes gather it too where
        the weights are sharded (`Ranks.led`)."""
        if self.sharded:
            self.ranks.announce_checkpoint()
        return self.state()

    def restore(self, state: TrainingState) -> None:
        self.load_trained_weights(state.adapter)
        if self.sharded:
            load_full_optimizer_state(
                self.model, self.optimizer, state.optimizer, self.trainable_names
            )
        else:
            self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.batches.restore(state.data_order)
        torch.set_rng_state(state.torch_rng)
        if state.cuda_rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state.cuda_rng)
        self.step = state.step
        self.loss_history = list(state.loss_history)
        self.tokens_seen = state.tokens_seen
        self.micro_batch_size = state.micro_batch_size
        self.evals = list(state.evals)
        self.best_weights = state.best_weights
        self.evals_since_best = state.evals_since_best

    def run(self, hooks: TrainingHooks | None = None) -> tuple[PeftModel, TrainingOutcome]:
        """Train up to `config.steps` (from wherever a restored state left off), or until early
        stopping; with an eval set the model ends with the best weights by eval loss."""
        hooks = hooks or TrainingHooks()
        config = self.config
        started = time.monotonic()
        first_step = self.step + 1
        stopped_early = False
        if self.eval_examples and not self.evals:
            self._evaluate(hooks)  # the base model's, for comparison
        self.model.train()
        for step in range(first_step, config.steps + 1):
            self.ranks.led(partial(hooks.before_step, step, self), self.state)
            step_started = time.monotonic()
            indices = self.batches.next()
            loss, trained_tokens, learning_rate = self._step_with_oom_recovery(step, indices, hooks)
            self.step = step
            self.tokens_seen += trained_tokens
            self.loss_history.append(loss)
            now = time.monotonic()
            evaluate = self.eval_examples and (
                step % self.eval_interval == 0 or step == config.steps
            )
            if evaluate:  # before after_step, so a checkpoint of this step holds its eval
                self._evaluate(hooks)
                self.model.train()
            report = StepReport(
                step=step,
                total_steps=config.steps,
                loss=loss,
                learning_rate=learning_rate,
                tokens_per_second=trained_tokens / max(now - step_started, 1e-9),
                eta_seconds=(now - started) / (step - first_step + 1) * (config.steps - step),
                samples_seen=step * config.batch_size,
            )
            self.ranks.led(partial(hooks.after_step, report, self), self.state)
            if evaluate and 0 < config.early_stopping_patience <= self.evals_since_best:
                stopped_early = step < config.steps
                break
        best = self.best_eval
        if best is not None and self.best_weights is not None and best[0] != self.step:
            self.load_trained_weights(self.best_weights)
        self.scale_update(config.adapter_scale)
        self.model.eval()  # dropout off for whoever samples from or evaluates the result
        # Sharded: gathered by every process now, for rank 0 to save (`save_trained`).
        self.whole_weights = self.trained_weights() if self.sharded else None
        return self.model, TrainingOutcome(
            loss_history=list(self.loss_history),
            final_loss=self.loss_history[-1],
            samples_seen=self.step * config.batch_size,
            tokens_seen=self.tokens_seen,
            duration_seconds=time.monotonic() - started,
            examples_trained=len(self.dataset.examples),
            examples_dropped=self.dataset.dropped,
            examples_truncated=self.dataset.truncated,
            examples_left_out=self.selection.left_out,
            steps_done=self.step,
            evals=list(self.evals),
            best_step=best[0] if best is not None else self.step,
            stopped_early=stopped_early,
        )

    def save_trained(self, directory: Path) -> None:
        """Save what the run trained, once it has ended: the adapter, or the whole model of a
        full fine-tune (from the weights every process gathered, where they are sharded)."""
        if self.whole_weights is not None:
            self.model.save_pretrained(directory, state_dict=self.whole_weights)
        else:
            self.model.save_pretrained(directory)

    def _evaluate(self, hooks: TrainingHooks) -> None:
        """Measure the eval loss now; keep the weights if they are the best after a step."""
        loss = self.eval_loss()
        self.evals.append((self.step, loss))
        best = self.best_eval
        improved = best is not None and best[0] == self.step
        if improved:
            self.best_weights = self.trained_weights()
            self.evals_since_best = 0
        elif self.step > 0:
            self.evals_since_best += 1
        best_step, best_loss = best if best is not None else (0, loss)
        hooks.after_eval(EvalReport(self.step, loss, best_loss, best_step, improved), self)

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Mean cross-entropy over every trained token of the eval set (dropout off), each
        process evaluating its share."""
        self.model.eval()
        # Sharded weights: every process runs every pass (FSDP's collectives), so each
        # evaluates the whole set.
        examples = self.eval_examples if self.sharded else self.ranks.share(self.eval_examples)
        total, tokens = 0.0, 0
        for batch in self._micro_batches(examples):
            total += float(summed_token_loss(self.model, batch))
            tokens += int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        if not self.sharded:
            total, tokens = self.ranks.total(total, tokens)
        return total / max(tokens, 1)

    def _micro_batches(self, examples: Sequence[TokenizedExample]) -> list[Batch]:
        """`examples` as micro-batches of `micro_batch_size` rows: packed (`packing`) where the
        model honours position resets, else one conversation a row, padded."""
        if not examples:
            return []
        if self.packing:
            return packed_batches(examples, self.micro_batch_size, self.pad_id, self.device)
        return [
            collate(examples[start : start + self.micro_batch_size], self.pad_id, self.device)
            for start in range(0, len(examples), self.micro_batch_size)
        ]

    def _step_with_oom_recovery(
        self, step: int, indices: list[int], hooks: TrainingHooks
    ) -> tuple[float, int, float]:
        """Take the step; after an OOM, halve the micro-batch and take it again from the same
        RNG state, up to MAX_OOM_RECOVERIES times."""
        rng = torch.get_rng_state()
        while True:
            try:
                return self._step(step, indices)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                torch.set_rng_state(rng)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if (
                    not self.oom_recovery
                    or self.oom_recoveries >= MAX_OOM_RECOVERIES
                    or self.micro_batch_size == 1
                ):
                    raise GpuOutOfMemoryError(
                        f"Out of memory at batch_size={self.config.batch_size} (micro-batches "
                        f"of {self.micro_batch_size}), max_length={self.config.max_length}, "
                        f"after {self.oom_recoveries} recoveries.",
                        hint="Halve --batch-size or --max-length, or use a smaller model.",
                    ) from error
                self.micro_batch_size = math.ceil(self.micro_batch_size / 2)
                self.oom_recoveries += 1
                log.warning(
                    "out of memory at step %d: micro-batch %d x %d accumulation, retrying",
                    step,
                    self.micro_batch_size,
                    self.gradient_accumulation,
                )
                hooks.on_oom_recovery(
                    OomRecovery(
                        step, self.micro_batch_size, self.gradient_accumulation, self.oom_recoveries
                    )
                )

    def _passes(self, micro_batches: list[Batch]) -> list[tuple[Batch, float]]:
        """This process's forward and backward passes of a step, each with its weight in the
        loss: the micro-batches with a trained token; where the weights are sharded, as many
        as any process runs (`sharding.evened`)."""
        if self.sharded:
            return evened(micro_batches, self.ranks)
        trained = [b for b in micro_batches if bool((b.labels[:, 1:] != IGNORE_INDEX).any())]
        return [(batch, 1.0) for batch in trained]

    def _step(self, step: int, indices: list[int]) -> tuple[float, int, float]:
        """One optimizer step over `indices`, this process taking its share: (mean loss,
        trained tokens, learning rate) of the whole step."""
        micro_batches = self._micro_batches(
            [self.dataset.examples[i] for i in self.ranks.share(indices)]
        )
        # Position t predicts token t + 1; only positions whose next token is trained count.
        (trained_tokens,) = self.ranks.total(
            sum(int((batch.labels[:, 1:] != IGNORE_INDEX).sum()) for batch in micro_batches)
        )
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        out_of_memory: BaseException | None = None
        try:
            for batch, weight in self._passes(micro_batches):
                summed = summed_token_loss(self.model, batch)
                if step == self.oom_drill_step:
                    self.oom_drill_step = None  # once
                    raise torch.OutOfMemoryError(f"Fault drill: out of memory at step {step}.")
                # Summed and divided by the step's token count: the same mean for any split.
                loss = summed * weight / max(trained_tokens, 1)
                loss.backward()
                step_loss += loss.item()
        except Exception as error:
            if not is_out_of_memory(error) or self.sharded:
                raise
            out_of_memory = error
        # Agreed before any gradient is exchanged: one process out of memory, all recover.
        failed, step_loss = self.ranks.total(out_of_memory is not None, step_loss)
        if failed:
            raise out_of_memory or torch.OutOfMemoryError(
                f"Another process of this run ran out of memory at step {step}."
            )
        if not self.sharded:  # FSDP summed them in the backward passes
            self.ranks.sum_gradients(self.trainable)
        torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        learning_rate = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        return step_loss, int(trained_tokens), learning_rate


def train_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[SftRow],
    config: TrainingConfig,
    on_step: Callable[[StepReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[PeftModel, TrainingOutcome]:
    """Fine-tune LoRA adapters on the assistant turns of `conversations`, from scratch.

    `model` is wrapped in place (its linear layers get lora_A / lora_B); its base weights do not
    change. Save the result with `peft_model.save_pretrained(directory)`.
    """
    training = LoraTraining(model, tokenizer, conversations, config)
    return training.run(CallbackHooks(on_step, should_stop))


def learning_rate_factor(
    step: int, warmup_steps: int, total_steps: int, schedule: str = "linear"
) -> float:
    """Learning-rate factor for optimizer step `step` (0-based): up linearly, then down
    (linearly, along a cosine) or constant.

    Unlike transformers' schedules, the first warmup step is not taken at rate 0 and the last step
    not at 0 either, so no step of a short run is wasted: linear factors for 2 warmup steps of 6
    are 1/2, 1, then 1, 3/4, 1/2, 1/4.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - progress


class BatchSampler:
    """Endless batches of example indices: each epoch a fresh seeded shuffle, batches always full;
    with `first_pass_in_order` (a curriculum) the first epoch goes in index order.

    A batch may span two epochs, so a dataset smaller than a batch still fills one. Its state
    (the RNG and the indices drawn but not yet used) is part of a checkpoint, so a resumed run
    sees the very batches the uninterrupted one would have.
    """

    def __init__(
        self, n_examples: int, batch_size: int, seed: int, first_pass_in_order: bool = False
    ) -> None:
        self.n_examples = n_examples
        self.batch_size = batch_size
        self.order = random.Random(seed)
        self.pending: list[int] = list(range(n_examples)) if first_pass_in_order else []

    def next(self) -> list[int]:
        while len(self.pending) < self.batch_size:
            epoch = list(range(self.n_examples))
            self.order.shuffle(epoch)
            self.pending.extend(epoch)
        batch = self.pending[: self.batch_size]
        del self.pending[: self.batch_size]
        return batch

    def state(self) -> dict[str, Any]:
        return {"rng": self.order.getstate(), "pending": list(self.pending)}

    def restore(self, state: dict[str, Any]) -> None:
        self.order.setstate(state["rng"])
        self.pending = list(state["pending"])


def summed_token_loss(model: PreTrainedModel | PeftModel, batch: Batch) -> torch.Tensor:
    """The loss, in plain sight: cross-entropy of the logits at position t against the token at
    t + 1, summed over the trained (assistant) tokens of one micro-batch (padded or packed)."""
    targets = batch.labels[:, 1:]
    predicts = F.pad(targets != IGNORE_INDEX, (0, 1), value=False)
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=predicts,
        use_cache=False,  # a KV cache is for generation
    ).logits
    return F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX], reduction="sum")


@torch.no_grad()
def example_perplexities(
    model: PreTrainedModel, examples: Sequence[TokenizedExample], pad_id: int
) -> list[float]:
    """Each example's perplexity under `model`: exp of its mean loss over its trained tokens.
    One row at a time, so padding never enters a score."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for example in examples:
        summed = summed_token_loss(model, collate([example], pad_id, device))
        loss = float(summed) / max(example.trained_tokens, 1)
        scores.append(math.exp(min(loss, 50.0)))  # e^50: past any row worth keeping
    model.train(was_training)
    return scores


def split_for_eval(
    conversations: Sequence[SftRow], fraction: float, seed: int
) -> tuple[list[SftRow], list[SftRow]]:
    """(train, eval): a seeded random `fraction` held out, at least one conversation on each
    side when there are two or more; no eval set for fraction 0."""
    if fraction <= 0 or len(conversations) < 2:
        return list(conversations), []
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    held_out = min(max(1, round(len(order) * fraction)), len(order) - 1)
    eval_indices = set(order[:held_out])
    return (
        [c for i, c in enumerate(conversations) if i not in eval_indices],
        [c for i, c in enumerate(conversations) if i in eval_indices],
    )


def collate(examples: Sequence[TokenizedExample], pad_id: int, device: torch.device) -> Batch:
    """Right-pad to the longest row of this batch: input_ids, attention_mask, labels (-100)."""
    longest = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example.labels)
    return Batch(input_ids.to(device), attention_mask.to(device), labels.to(device))
