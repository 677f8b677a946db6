"""The LoRA SFT loop: one function, read top to bottom (setup, the step, the report).

The loss is computed in `train_lora`, in plain sight: cross-entropy of the logits at position t
against the token at t + 1, over assistant tokens only (see `templating`). Logits are projected
only at those positions (`logits_to_keep` with a boolean mask): the full-vocabulary fp32 logits
of every prompt and padding position would otherwise dominate memory and a fifth of the compute.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from backpropagate_services.common.errors import (
    DatasetEmptyError,
    GpuOutOfMemoryError,
    JobCancelledError,
)
from backpropagate_services.trainer.lora import TrainingConfig, apply_lora
from backpropagate_services.trainer.templating import (
    IGNORE_INDEX,
    Conversation,
    TokenizedExample,
    tokenize_conversations,
)

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


@dataclass(frozen=True)
class TrainingOutcome:
    loss_history: list[float]
    final_loss: float
    samples_seen: int
    tokens_seen: int  # trained (assistant) tokens, the ones the loss was computed on
    duration_seconds: float
    examples_trained: int
    examples_dropped: int  # conversations with no assistant token left within max_length


def train_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Conversation],
    config: TrainingConfig,
    on_step: Callable[[StepReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[PeftModel, TrainingOutcome]:
    """Fine-tune LoRA adapters on the assistant turns of `conversations`.

    `model` is wrapped in place (its linear layers get lora_A / lora_B); its base weights do not
    change. Save the result with `peft_model.save_pretrained(directory)`.
    """
    config.validate()
    dataset = tokenize_conversations(conversations, tokenizer, config.max_length)
    if not dataset.examples:
        raise DatasetEmptyError(
            f"None of the {len(conversations)} conversations has an assistant token within "
            f"max_length={config.max_length}.",
            hint="Raise --max-length, or check that the rows have assistant turns.",
        )
    if dataset.dropped:
        log.warning("dropped %d conversations cut off before any assistant token", dataset.dropped)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    torch.manual_seed(config.seed)  # LoRA init and dropout; data order has its own seeded Random
    peft_model = apply_lora(model, config)
    device = next(peft_model.parameters()).device
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_decay(step, config.warmup_steps, config.steps)
    )
    batches = shuffled_batches(len(dataset.examples), config.batch_size, config.seed)
    loss_history: list[float] = []
    tokens_seen = 0
    started = time.monotonic()

    peft_model.train()
    try:
        for step in range(1, config.steps + 1):
            if should_stop is not None and should_stop():
                raise JobCancelledError(f"Cancelled before step {step} of {config.steps}.")
            step_started = time.monotonic()
            input_ids, attention_mask, labels = collate(
                [dataset.examples[i] for i in next(batches)], pad_id, device
            )
            # Position t predicts token t + 1; only positions whose next token is trained count.
            targets = labels[:, 1:]
            predicts = F.pad(targets != IGNORE_INDEX, (0, 1), value=False)
            logits = peft_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                logits_to_keep=predicts,
                use_cache=False,  # a KV cache is for generation
            ).logits
            loss = F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX])

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            learning_rate = float(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()

            trained_tokens = int(predicts.sum())
            tokens_seen += trained_tokens
            loss_history.append(loss.item())
            if on_step is not None:
                now = time.monotonic()
                on_step(
                    StepReport(
                        step=step,
                        total_steps=config.steps,
                        loss=loss_history[-1],
                        learning_rate=learning_rate,
                        tokens_per_second=trained_tokens / max(now - step_started, 1e-9),
                        eta_seconds=(now - started) / step * (config.steps - step),
                        samples_seen=step * config.batch_size,
                    )
                )
    except torch.cuda.OutOfMemoryError as error:
        raise GpuOutOfMemoryError(
            f"The GPU ran out of memory at batch_size={config.batch_size}, "
            f"max_length={config.max_length}.",
            hint="Halve --batch-size or --max-length, or use a smaller model.",
        ) from error
    peft_model.eval()  # dropout off for whoever samples from or evaluates the result

    return peft_model, TrainingOutcome(
        loss_history=loss_history,
        final_loss=loss_history[-1],
        samples_seen=config.steps * config.batch_size,
        tokens_seen=tokens_seen,
        duration_seconds=time.monotonic() - started,
        examples_trained=len(dataset.examples),
        examples_dropped=dataset.dropped,
    )


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor for optimizer step `step` (0-based): up linearly, then down linearly.

    Unlike transformers' schedule, the first warmup step is not taken at rate 0 and the last step
    not at 0 either, so no step of a short run is wasted: factors for 2 warmup steps of 6 are
    1/2, 1, then 1, 3/4, 1/2, 1/4.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return (total_steps - step) / (total_steps - warmup_steps)


def shuffled_batches(n_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of example indices: each epoch a fresh seeded shuffle, batches always full.

    A batch may span two epochs, so a dataset smaller than a batch still fills one.
    """
    order = random.Random(seed)
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            epoch = list(range(n_examples))
            order.shuffle(epoch)
            pending.extend(epoch)
        yield pending[:batch_size]
        del pending[:batch_size]


def collate(
    examples: Sequence[TokenizedExample], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    return input_ids.to(device), attention_mask.to(device), labels.to(device)
