"""The reference chats every export is checked on, and the torch model's logits on them.

Ten short chats in the shapes users fine-tune on, rendered with the model's own chat template.
Only the last assistant reply is scored: that is what the model says, while the template and
system prompt around it are easy to predict and would dilute the figures. The merge is checked
on them (merged model against base + adapter) and so is the GGUF (llama.cpp against torch): the
merged model's logits, computed once, serve both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
class ScoredChat:
    text: str
    token_ids: list[int]
    reply_start: int  # index of the first token of the scored assistant reply
    reply_end: int  # index of the end-of-turn token that closes it

    @property
    def scored_positions(self) -> slice:
        """Logits at position i predict token i + 1: those that predict the reply and its
        end-of-turn token. What the template writes after that token is trivially predictable
        and would inflate agreement."""
        return slice(self.reply_start - 1, self.reply_end)

    @property
    def scored_targets(self) -> list[int]:
        """The tokens the scored positions predict: the reply, then its end-of-turn token."""
        return self.token_ids[self.reply_start : self.reply_end + 1]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The template writes the special tokens itself; adding them again would double BOS.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def scored_chats(tokenizer: PreTrainedTokenizerBase) -> list[ScoredChat]:
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
        # The end-of-turn token is the first one after the reply's text: the template writes it
        # right there, whatever its name (<|im_end|>, <|eot_id|>, </s>, <end_of_turn>).
        reply = messages[-1]["content"]
        reply_end = len(_encode(tokenizer, text[: text.rindex(reply) + len(reply)]))
        scored.append(ScoredChat(text, token_ids, reply_start, reply_end))
    return scored


def reference_logits(model: PreTrainedModel, chats: list[ScoredChat]) -> list[torch.Tensor]:
    """The model's float32 logits at each chat's scored positions, on the CPU."""
    import torch

    device = next(model.parameters()).device
    logits = []
    with torch.inference_mode():
        for chat in chats:
            output = model(torch.tensor([chat.token_ids], device=device)).logits[0]
            logits.append(output[chat.scored_positions].float().cpu())
    return logits
