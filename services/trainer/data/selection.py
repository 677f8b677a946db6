"""Which tokenised rows a run trains on, and the order of its first pass over them.

Length bounds (`min_tokens`, `max_tokens`) leave out rows too short to teach anything and rows
too long to train whole (instead of cutting them at max_length). The perplexity filter scores
every row with the base model, before the adapter has changed anything, and leaves out the
`perplexity_drop` fraction it finds least likely: in scraped or merged data those are mostly
garbled text, wrong labels and other languages. A curriculum orders the first pass easiest first
(shortest, or lowest perplexity), which steadies the first steps of a run on mixed data; later
passes are shuffled as usual.

Scores come from the base model alone and the choices from the config, so a resumed run, which
selects again, makes the same selection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from backpropagate_api.training import TrainingConfig
from backpropagate_services.trainer.data.templating import TokenizedExample


@dataclass(frozen=True)
class Selection:
    kept: list[int]  # indices of the examples that train, in the first pass's order
    too_short: int
    too_long: int
    high_perplexity: int
    ordered: bool  # a curriculum: the first pass follows `kept`'s order, not a shuffle

    @classmethod
    def everything(cls, count: int) -> Selection:
        """Every example, shuffled: what a run without bounds, filter or curriculum trains on."""
        return cls(list(range(count)), 0, 0, 0, ordered=False)

    @property
    def left_out(self) -> int:
        return self.too_short + self.too_long + self.high_perplexity

    def described(self, config: TrainingConfig) -> str:
        """What was left out, as the run's log and events say it."""
        return (
            f"left out {self.too_short} rows under {config.min_tokens} tokens, {self.too_long} "
            f"over {config.max_tokens}, {self.high_perplexity} of the highest perplexity"
        )


def needs_perplexity(config: TrainingConfig) -> bool:
    return config.perplexity_drop > 0 or config.curriculum == "perplexity"


def select_examples(
    examples: Sequence[TokenizedExample],
    config: TrainingConfig,
    perplexity: Callable[[Sequence[TokenizedExample]], list[float]] | None = None,
) -> Selection:
    """`perplexity`: per-example base-model perplexity, called once when the config needs it."""
    too_short = [i for i, ex in enumerate(examples) if ex.length < config.min_tokens]
    too_long = [
        i for i, ex in enumerate(examples) if config.max_tokens and ex.length > config.max_tokens
    ]
    out = set(too_short) | set(too_long)
    kept = [i for i in range(len(examples)) if i not in out]
    high: list[int] = []
    scores: dict[int, float] = {}
    if needs_perplexity(config) and kept:
        assert perplexity is not None, "the perplexity filter and curriculum score rows"
        scores = dict(zip(kept, perplexity([examples[i] for i in kept]), strict=True))
        by_score = sorted(kept, key=lambda i: (scores[i], i))
        dropped = math.floor(config.perplexity_drop * len(kept))
        high = by_score[len(by_score) - dropped :] if dropped else []
        left_out = set(high)
        kept = [i for i in kept if i not in left_out]
    if config.curriculum == "length":
        kept.sort(key=lambda i: (examples[i].length, i))
    elif config.curriculum == "perplexity":
        kept.sort(key=lambda i: (scores[i], i))
    # No row is both: a validated config has max_tokens 0 or at least min_tokens.
    return Selection(
        kept, len(too_short), len(too_long), len(high), ordered=config.curriculum != "none"
    )
