"""Batches without padding waste: several conversations share a row, each with its own position
ids, and attention never crosses from one into another.

A step's conversations are packed first-fit-decreasing into rows as long as its longest one, so
a micro-batch keeps the shape (rows x longest) that memory was planned for while most of the
positions that padding held carry tokens. transformers builds the block-diagonal causal mask
itself from position ids that restart at 0 (`masking_utils.find_packed_sequence_indices`) when
no attention mask is given. The loss is unchanged: a row's first token is never a target of the
row before it (it is a prompt token, and its label is set to -100 besides), and the loss is the
sum over trained tokens divided by the step's count, whatever the layout.

`packing_works` checks that a model honours position resets before a run relies on them: an
architecture that ignores them would let conversations attend to each other silently.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch

from backpropagate_services.trainer.data.templating import IGNORE_INDEX, TokenizedExample

log = logging.getLogger(__name__)


class Batch(NamedTuple):
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # None: packed rows, told apart by position_ids
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None


def pack_rows(examples: Sequence[TokenizedExample]) -> list[list[int]]:
    """Indices of `examples` per row: first-fit decreasing into rows as long as the longest."""
    capacity = max(len(example.input_ids) for example in examples)
    rows: list[list[int]] = []
    room: list[int] = []
    by_length = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    for index in by_length:
        length = len(examples[index].input_ids)
        row = next((r for r, left in enumerate(room) if left >= length), None)
        if row is None:
            rows.append([index])
            room.append(capacity - length)
        else:
            rows[row].append(index)
            room[row] -= length
    return rows


def packed_batches(
    examples: Sequence[TokenizedExample], rows_per_batch: int, pad_id: int, device: torch.device
) -> list[Batch]:
    """`examples` packed into rows (`pack_rows`), `rows_per_batch` rows a micro-batch."""
    rows = pack_rows(examples)
    return [
        _collate_rows(examples, rows[start : start + rows_per_batch], pad_id, device)
        for start in range(0, len(rows), rows_per_batch)
    ]


def _collate_rows(
    examples: Sequence[TokenizedExample], rows: list[list[int]], pad_id: int, device: torch.device
) -> Batch:
    """One micro-batch of packed rows, as long as its longest; the padding at a row's end is a
    sequence of its own, never attended to by a real one, never trained."""
    capacity = max(sum(len(examples[index].input_ids) for index in row) for row in rows)
    input_ids = torch.full((len(rows), capacity), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), capacity), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), capacity), dtype=torch.long)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            example = examples[index]
            end = start + len(example.input_ids)
            input_ids[row, start:end] = torch.tensor(example.input_ids)
            labels[row, start:end] = torch.tensor(example.labels)
            labels[row, start] = IGNORE_INDEX  # never the target of the conversation before
            position_ids[row, start:end] = torch.arange(end - start)
            start = end
        position_ids[row, start:] = torch.arange(capacity - start)
    return Batch(input_ids.to(device), None, labels.to(device), position_ids.to(device))


@torch.no_grad()
def packing_works(model: torch.nn.Module, tolerance: float) -> bool:
    """Whether `model` gives two short sequences packed in one row the logits it gives each
    alone (within `tolerance`, for the compute dtype): its attention honours position resets."""
    device = next(model.parameters()).device
    first, second = [5, 17, 29, 41, 53, 65], [7, 19, 31, 43]
    was_training = model.training
    model.eval()
    try:
        alone = [
            model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]
            for ids in (first, second)
        ]
        packed = model(
            input_ids=torch.tensor([first + second], device=device),
            position_ids=torch.tensor(
                [list(range(len(first))) + list(range(len(second)))], device=device
            ),
            use_cache=False,
        ).logits[0]
    except Exception as exc:  # a model that cannot tell us: pad, and let training say why
        log.warning("packing check failed (%s): rows are padded", type(exc).__name__)
        return False
    finally:
        model.train(was_training)
    expected = torch.cat(alone)
    return bool(torch.allclose(packed.float(), expected.float(), atol=tolerance, rtol=tolerance))
