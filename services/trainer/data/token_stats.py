"""A dataset in the model's tokens, before anything trains: how long its rows are, what
max_length cuts, and what of the first row is learnt.

Lengths are of whole rows, as the model's own template renders them (`templating`), so a user can
pick a max_length that keeps most rows whole instead of learning after the run that the ends of
their longest answers were never trained.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backpropagate_services.trainer.data.templating import (
    IGNORE_INDEX,
    SftRow,
    TokenizedExample,
    tokenize_conversations,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HISTOGRAM_BINS = 10
UNCUT = sys.maxsize  # a max_length that cuts nothing: whole rows


@dataclass(frozen=True)
class LengthBin:
    low: int  # tokens, inclusive
    high: int  # tokens, inclusive
    rows: int


@dataclass(frozen=True)
class SampleSpan:
    """A stretch of the first row's rendering: "context" (read, not learnt), "trained", or
    "cut" (beyond max_length: never seen in training)."""

    text: str
    kind: str


@dataclass(frozen=True)
class TokenStats:
    rows: int
    tokens: int  # every row whole
    trained_tokens: int  # learnt within max_length
    lengths: tuple[int, ...]  # each row's, sorted
    histogram: tuple[LengthBin, ...]
    truncated: int  # rows longer than max_length, still trained on their start
    dropped: int  # rows with no trained token within max_length: they do not train at all
    sample: tuple[SampleSpan, ...]

    @property
    def p95(self) -> int:
        return self.lengths[min(len(self.lengths) - 1, int(0.95 * len(self.lengths)))]

    @property
    def median(self) -> int:
        return int(statistics.median_low(self.lengths))


def token_stats(
    rows: Sequence[SftRow], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenStats:
    """Token statistics of `rows` (conversations or documents) at `max_length`."""
    whole = tokenize_conversations(rows, tokenizer, UNCUT).examples
    within = [_trained_within(example, max_length) for example in whole]
    lengths = sorted(len(example.input_ids) for example in whole)
    return TokenStats(
        rows=len(rows),
        tokens=sum(lengths),
        trained_tokens=sum(within),
        lengths=tuple(lengths),
        histogram=_histogram(lengths),
        truncated=sum(
            len(example.input_ids) > max_length and trained > 0
            for example, trained in zip(whole, within, strict=True)
        ),
        # A row with nothing to train even whole is one too.
        dropped=len(rows) - len(whole) + within.count(0),
        sample=_spans(whole[0], tokenizer, max_length) if whole else (),
    )


def _trained_within(example: TokenizedExample, max_length: int) -> int:
    # As TokenizedExample.trained_tokens counts them: the first token is never predicted.
    return sum(label != IGNORE_INDEX for label in example.labels[1:max_length])


def _histogram(lengths: list[int]) -> tuple[LengthBin, ...]:
    """Equal-width bins from the shortest row to the longest."""
    if not lengths:
        return ()
    low, high = lengths[0], lengths[-1]
    width = max(1, -(-(high - low + 1) // HISTOGRAM_BINS))  # ceil: the longest row is inside
    bins = []
    for start in range(low, high + 1, width):
        end = start + width - 1
        bins.append(LengthBin(start, end, sum(start <= n <= end for n in lengths)))
    return tuple(bins)


def _spans(
    example: TokenizedExample, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[SampleSpan, ...]:
    def kind(position: int) -> str:
        if position >= max_length:
            return "cut"
        return "context" if example.labels[position] == IGNORE_INDEX else "trained"

    spans: list[tuple[str, list[int]]] = []
    for position, token in enumerate(example.input_ids):
        if spans and spans[-1][0] == kind(position):
            spans[-1][1].append(token)
        else:
            spans.append((kind(position), [token]))
    return tuple(SampleSpan(str(tokenizer.decode(ids)), name) for name, ids in spans)
