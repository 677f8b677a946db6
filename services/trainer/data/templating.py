"""Conversations to `input_ids` and `labels` with the target model's own chat template.

The model learns only what the assistant says: every system, user and template token (the
assistant header `<|im_start|>assistant\\n` included) has the label -100, and each assistant turn
is trained up to and including the template's end-of-turn token, so the model learns to stop.

Why incremental rendering: a template does not say which tokens belong to which message, and most
(SmolLM2's included) have no `{% generation %}` markers. Rendering the conversation up to the
assistant header and up to the end of the assistant message gives two token sequences; when each
is a prefix of the next, the difference is exactly that message's tokens. A template that
re-renders earlier turns (one that drops past reasoning, say) breaks that property, and we refuse
it rather than guess. Labels are never derived from pad ids: pad == eos in many tokenizers.

A document of plain text (a text dataset's row) is trained as completion: no template, every
token learnt, and the tokenizer's end-of-sequence token after it, so the model learns where a
document ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jinja2 import TemplateError

from backpropagate_api.errors import ConfigError, DatasetSchemaError
from backpropagate_services.common.datasets import SftRow

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # what torch's cross_entropy and HF models skip in the loss
ROLES = frozenset({"system", "user", "assistant"})

Conversation = Sequence[dict[str, str]]


@dataclass(frozen=True)
class TokenizedExample:
    """One training row: `labels[i]` is `input_ids[i]` where it is trained, else -100."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # cut at max_length: the end of the conversation is not trained
    whole_length: int = 0  # tokens before the cut (0: as many as input_ids)

    @property
    def length(self) -> int:
        """The row's tokens, whole: what length bounds and curricula go by."""
        return self.whole_length or len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        # The first token has no context to be predicted from, so it never counts.
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass(frozen=True)
class TokenizedDataset:
    examples: list[TokenizedExample]
    dropped: int  # rows with no trainable token left (assistant turns cut off by max_length)

    @property
    def truncated(self) -> int:
        """Rows kept but cut at max_length: part of what they teach is lost."""
        return sum(example.truncated for example in self.examples)


def tokenize_conversation(
    conversation: Conversation, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedExample | None:
    """Template and mask one conversation; None when no assistant token fits in max_length."""
    messages = list(conversation)
    _check_messages(messages)
    if not tokenizer.chat_template:
        raise ConfigError(
            f"{tokenizer.name_or_path!r} has no chat template, so conversations cannot be "
            "rendered the way the model will be prompted.",
            hint="Fine-tune an instruct (chat) model, or one whose tokenizer defines a template.",
            model=tokenizer.name_or_path,
        )
    input_ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(input_ids)
    end_of_turn_ids = _end_of_turn_candidates(tokenizer)
    for position, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header = _render(tokenizer, messages[:position], add_generation_prompt=True)
        turn = (
            input_ids
            if position == len(messages) - 1
            else _render(tokenizer, messages[: position + 1], add_generation_prompt=False)
        )
        start = _assistant_start(header, turn, tokenizer, position)
        _require_prefix(turn, input_ids, tokenizer, position)
        stop = _trained_stop(turn, start, end_of_turn_ids)
        labels[start:stop] = input_ids[start:stop]
    example = TokenizedExample(
        input_ids[:max_length],
        labels[:max_length],
        truncated=len(input_ids) > max_length,
        whole_length=len(input_ids),
    )
    return example if example.trained_tokens else None


def tokenize_document(
    text: str, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedExample | None:
    """A document for completion training, every token trained; None when nothing is left to
    predict (a single token)."""
    # Special tokens typed in the text stay text, as in a conversation's messages.
    input_ids = list(tokenizer(text, split_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
    kept = input_ids[:max_length]
    example = TokenizedExample(
        kept, list(kept), truncated=len(input_ids) > max_length, whole_length=len(input_ids)
    )
    return example if example.trained_tokens else None


def tokenize_conversations(
    conversations: Sequence[SftRow], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedDataset:
    """Template every conversation (or take every document), dropping and counting those left
    with nothing to train."""
    examples: list[TokenizedExample] = []
    dropped = 0
    for row, conversation in enumerate(conversations):
        try:
            example = (
                tokenize_document(conversation, tokenizer, max_length)
                if isinstance(conversation, str)
                else tokenize_conversation(conversation, tokenizer, max_length)
            )
        except DatasetSchemaError as error:
            raise DatasetSchemaError(f"Conversation {row}: {error.message}", row=row) from error
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    return TokenizedDataset(examples, dropped)


def _check_messages(messages: list[dict[str, str]]) -> None:
    for position, message in enumerate(messages):
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise DatasetSchemaError(
                f"Message {position} needs a role in {sorted(ROLES)} and a string content, "
                f"got {message!r}."
            )
    if messages and messages[0]["role"] == "assistant":
        # Its header would have to be rendered from an empty history, which templates refuse.
        raise DatasetSchemaError("A conversation must not open with an assistant message.")


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
            # "<|im_end|>" typed inside a message stays text instead of closing the turn early.
            sanitize_control_tokens=True,
        )
    except TemplateError as error:  # the template's own raise_exception(), e.g. role order
        raise DatasetSchemaError(f"The model's chat template rejects it: {error}") from error
    return list(ids)


def _assistant_start(
    header: list[int], turn: list[int], tokenizer: PreTrainedTokenizerBase, position: int
) -> int:
    """Where the assistant message's tokens begin in `turn`: right after its header.

    A reply that starts with whitespace (code: "\\n    def f():") can merge with the header's
    last token ("assistant\\n" + "\\n" is one "\\n\\n" token), so the header is then a prefix of
    the turn but for its last token: the reply starts at that merged token, which is trained.
    """
    common = next(
        (index for index, (a, b) in enumerate(zip(header, turn, strict=False)) if a != b),
        min(len(header), len(turn)),
    )
    if common < len(header) - 1:
        _require_prefix(header, turn, tokenizer, position)  # raises: not a merge at the boundary
    return common


def _require_prefix(
    prefix: list[int], full: list[int], tokenizer: PreTrainedTokenizerBase, position: int
) -> None:
    if full[: len(prefix)] != prefix:
        raise ConfigError(
            f"The chat template of {tokenizer.name_or_path!r} renders the conversation up to "
            f"message {position} differently once later messages follow, so assistant tokens "
            "cannot be located for the loss mask.",
            hint="Train with a template that renders past turns unchanged (a prefix-stable one).",
            model=tokenizer.name_or_path,
        )


def _end_of_turn_candidates(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    # End-of-turn markers (<|im_end|>, <|eot_id|>, <end_of_turn>, </s>) are special added tokens;
    # with sanitize_control_tokens no message content can produce one.
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return frozenset(special | set(tokenizer.all_special_ids))


def _trained_stop(turn: list[int], start: int, end_of_turn_ids: frozenset[int]) -> int:
    """Index after the assistant turn's last special token (its end of turn).

    Whatever the template writes after it (SmolLM2's "\\n") is a separator for the next turn, not
    something the model must learn to say; a template with no end-of-turn token trains it all.
    """
    for index in range(len(turn) - 1, start - 1, -1):
        if turn[index] in end_of_turn_ids:
            return index + 1
    return len(turn)
