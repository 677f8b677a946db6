"""Packed rows train exactly as padded ones: every conversation lands once in a row no longer
than the longest, attention never crosses conversations, and the loss, its gradients and a short
run's loss history match those of padding (within float tolerance) on a tiny Llama."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from test_training_loop import tiny_llama
from transformers import PreTrainedTokenizerBase

from backpropagate_api.training import TrainingConfig
from backpropagate_services.trainer.adapters.lora import apply_adapter
from backpropagate_services.trainer.data.packing import pack_rows, packed_batches, packing_works
from backpropagate_services.trainer.data.templating import (
    IGNORE_INDEX,
    TokenizedExample,
    tokenize_conversations,
)
from backpropagate_services.trainer.loop.sft import LoraTraining, collate, summed_token_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def conversations(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Questions and answers of a long-tailed mix of lengths, as real chat data has."""
    rng = random.Random(seed)
    words = [
        "river",
        "stone",
        "cloud",
        "apple",
        "north",
        "quiet",
        "bright",
        "seven",
        "garden",
        "paper",
    ]
    rows = []
    for index in range(count):
        length = min(int(rng.lognormvariate(2.0, 0.9)) + 1, 60)
        answer = " ".join(rng.choice(words) for _ in range(length))
        rows.append(
            [
                {"role": "user", "content": f"Tell me thing {index}."},
                {"role": "assistant", "content": answer},
            ]
        )
    return rows


def examples_of(tokenizer: PreTrainedTokenizerBase, count: int) -> list[TokenizedExample]:
    return tokenize_conversations(conversations(count), tokenizer, 256).examples


def test_every_example_lands_once_in_a_row_no_longer_than_the_longest() -> None:
    lengths = [10, 3, 3, 4, 9, 1, 7, 2]
    examples = [TokenizedExample([1] * n, [1] * n) for n in lengths]

    rows = pack_rows(examples)

    assert sorted(index for row in rows for index in row) == list(range(len(lengths)))
    assert all(sum(lengths[index] for index in row) <= max(lengths) for row in rows)
    assert len(rows) == 4  # 39 tokens in rows of 10: the fewest there can be


def test_a_packed_row_restarts_positions_and_never_trains_across_conversations() -> None:
    first = TokenizedExample([11, 12, 13, 14], [IGNORE_INDEX, IGNORE_INDEX, 13, 14])
    second = TokenizedExample([21, 22], [21, 22])  # labels on its first token too
    third = TokenizedExample([31, 32, 33, 34, 35, 36], [IGNORE_INDEX, 32, 33, 34, 35, 36])
    fourth = TokenizedExample([41], [41])

    [batch] = packed_batches([first, second, third, fourth], 3, pad_id=0, device=CPU)

    assert batch.attention_mask is None and batch.position_ids is not None
    assert batch.input_ids.tolist() == [
        [31, 32, 33, 34, 35, 36],
        [11, 12, 13, 14, 21, 22],
        [41, 0, 0, 0, 0, 0],
    ]
    assert batch.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 0, 1],
        [0, 0, 1, 2, 3, 4],  # the padding is a sequence of its own
    ]
    assert batch.labels.tolist() == [
        [IGNORE_INDEX, 32, 33, 34, 35, 36],
        [IGNORE_INDEX, IGNORE_INDEX, 13, 14, IGNORE_INDEX, 22],  # 21 is no target of 14
        [IGNORE_INDEX] * 6,
    ]


def assert_equal_but_for_summation_order(
    mine: torch.Tensor, theirs: torch.Tensor, terms: int
) -> None:
    """Equal up to fp32 rounding of sums taken in another order.

    Packed and padded batches add the same per-token contributions in another order, and so do
    CPUs (AVX-512 kernels add 16 lanes at a time, AVX2 ones 8). Summing n float32 terms in any
    order moves the result by at most about n * eps * (the sum of their magnitudes) (Higham,
    Accuracy and Stability of Numerical Algorithms, section 4.2); the tensor's largest element
    stands for that magnitude. Measured for the gradients below on a 2-core AMD EPYC: at most
    16 eps x scale for 632 tokens, against 1.5 million when attention crosses conversations.
    """
    scale = theirs.abs().max().item()
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(mine, theirs, rtol=0.0, atol=terms * eps * scale)


def loss_and_gradients(model: torch.nn.Module, batches: list) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    total = sum(summed_token_loss(model, batch) for batch in batches)
    total.backward()
    gradients = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return float(total), gradients


def test_packed_loss_and_gradients_equal_padded_ones(
    smollm2_tokenizer: PreTrainedTokenizerBase,
) -> None:
    examples = examples_of(smollm2_tokenizer, 12)
    pad_id = smollm2_tokenizer.pad_token_id or 0
    torch.manual_seed(0)
    model = apply_adapter(tiny_llama(smollm2_tokenizer), TrainingConfig(lora_dropout=0.0))
    with torch.no_grad():  # LoRA's B starts at zero: give the adapter gradients of its own
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)

    padded_batches = [collate(examples[i : i + 4], pad_id, CPU) for i in range(0, 12, 4)]
    padded_loss, padded = loss_and_gradients(model, padded_batches)
    packed = packed_batches(examples, 2, pad_id, CPU)
    packed_loss, packed_gradients = loss_and_gradients(model, packed)

    positions = [sum(b.input_ids.numel() for b in batches) for batches in (packed, padded_batches)]
    assert positions[0] < positions[1]  # less padding
    # Each weight's gradient sums one contribution per input token.
    tokens = sum(len(example.input_ids) for example in examples)
    assert packed_loss == pytest.approx(padded_loss, rel=tokens * torch.finfo(torch.float32).eps)
    for mine, theirs in zip(packed_gradients, padded, strict=True):
        assert_equal_but_for_summation_order(mine, theirs, tokens)


def test_a_short_run_has_the_same_losses_packed_and_padded(
    smollm2_tokenizer: PreTrainedTokenizerBase,
) -> None:
    config = TrainingConfig(steps=6, batch_size=6, learning_rate=1e-2, lora_dropout=0.0)
    histories = []
    for packing in (True, False):
        training = LoraTraining(
            tiny_llama(smollm2_tokenizer),
            smollm2_tokenizer,
            conversations(18),
            config,
            packing=packing,
        )
        assert training.packing is packing
        _, outcome = training.run()
        histories.append(outcome.loss_history)

    assert histories[0] == pytest.approx(histories[1], rel=1e-4)


class BagOfTokens(torch.nn.Module):
    """A causal model that ignores position ids: each position sees the sum of all before it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 8)

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.embed(input_ids).cumsum(dim=1))


def test_the_packing_check_tells_a_model_that_honours_resets_from_one_that_does_not(
    smollm2_tokenizer: PreTrainedTokenizerBase,
) -> None:
    assert packing_works(tiny_llama(smollm2_tokenizer), tolerance=1e-3)
    assert not packing_works(BagOfTokens(), tolerance=1e-3)


def test_bf16_training_reaches_the_eval_loss_of_fp32(
    smollm2_tokenizer: PreTrainedTokenizerBase,
) -> None:
    """The base model in bf16 (what CPUs with AMX or AVX-512 BF16 and GPUs compute in), LoRA
    weights and the loss in fp32: the same small task ends within 5% of fp32's eval loss
    (measured: 11.41 against 11.34, 0.6%)."""
    rows = conversations(24, seed=3)
    config = TrainingConfig(steps=40, batch_size=4, learning_rate=2e-2, lora_dropout=0.0)
    final = {}
    for dtype in (torch.float32, torch.bfloat16):
        training = LoraTraining(
            tiny_llama(smollm2_tokenizer).to(dtype),
            smollm2_tokenizer,
            rows[:20],
            config,
            eval_conversations=rows[20:],
        )
        assert all(p.dtype == torch.float32 for p in training.trainable)
        before = training.eval_loss()
        training.run()
        final[dtype] = training.eval_loss()
        assert final[dtype] < before * 0.85  # it learnt (measured: 14.83 -> 11.34 in fp32)

    assert final[torch.bfloat16] == pytest.approx(final[torch.float32], rel=0.05)
