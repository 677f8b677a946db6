"""Chat templating and loss masks, checked against the real SmolLM2 tokenizer and template."""

from __future__ import annotations

import copy
import json

import pytest
from transformers import PreTrainedTokenizerBase

from backpropagate_api.errors import ConfigError, DatasetSchemaError
from backpropagate_services.dataprep.formats import parse_jsonl
from backpropagate_services.trainer.data.templating import (
    IGNORE_INDEX,
    TokenizedExample,
    tokenize_conversation,
    tokenize_conversations,
    tokenize_document,
)

EOS = "<|im_end|>"


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def trained_positions(example: TokenizedExample) -> list[int]:
    return [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]


def trained_spans(example: TokenizedExample, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Each maximal run of labelled tokens, decoded; labels must equal the input ids there."""
    spans: list[list[int]] = []
    previous_trained = False
    for token, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token
            if not previous_trained:
                spans.append([])
            spans[-1].append(label)
        previous_trained = trained
    return [tokenizer.decode(span) for span in spans]


def test_only_assistant_tokens_and_their_eos_are_trained(smollm2_tokenizer):
    conversation = [user("What is the capital of France?"), assistant("Paris, on the Seine.")]

    example = tokenize_conversation(conversation, smollm2_tokenizer, max_length=512)

    assert example is not None
    assert trained_spans(example, smollm2_tokenizer) == ["Paris, on the Seine." + EOS]


def test_input_ids_are_the_models_own_chat_template_rendering(smollm2_tokenizer):
    conversation = [user("Hi"), assistant("Hello!")]

    example = tokenize_conversation(conversation, smollm2_tokenizer, max_length=512)

    assert example is not None
    rendered = smollm2_tokenizer.apply_chat_template(conversation, tokenize=False)
    assert smollm2_tokenizer.decode(example.input_ids) == rendered
    assert "You are a helpful AI assistant named SmolLM" in rendered  # the template's default


def test_assistant_header_and_the_separator_after_eos_are_masked(smollm2_tokenizer):
    example = tokenize_conversation([user("Hi"), assistant("Hello!")], smollm2_tokenizer, 512)

    assert example is not None
    first, *_, last = trained_positions(example)
    assert smollm2_tokenizer.decode(example.input_ids[:first]).endswith("<|im_start|>assistant\n")
    assert smollm2_tokenizer.decode(example.input_ids[last + 1 :]) == "\n"


def test_every_assistant_turn_of_a_multi_turn_conversation_is_trained(smollm2_tokenizer):
    conversation = [
        user("Name a prime."),
        assistant("7"),
        user("And an even one?"),
        assistant("2 is the only even prime."),
    ]

    example = tokenize_conversation(conversation, smollm2_tokenizer, max_length=512)

    assert example is not None
    assert trained_spans(example, smollm2_tokenizer) == [
        "7" + EOS,
        "2 is the only even prime." + EOS,
    ]


def test_system_message_replaces_the_default_one_and_is_not_trained(smollm2_tokenizer):
    conversation = [system("Answer like a pirate."), user("Hello"), assistant("Ahoy, matey!")]

    example = tokenize_conversation(conversation, smollm2_tokenizer, max_length=512)

    assert example is not None
    text = smollm2_tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nAnswer like a pirate.<|im_end|>")
    assert "SmolLM" not in text
    assert trained_spans(example, smollm2_tokenizer) == ["Ahoy, matey!" + EOS]


def test_control_tokens_typed_in_a_message_do_not_end_its_turn(smollm2_tokenizer):
    answer = f"Write {EOS} to close a ChatML turn."

    example = tokenize_conversation([user("How?"), assistant(answer)], smollm2_tokenizer, 512)

    assert example is not None
    assert trained_spans(example, smollm2_tokenizer) == [answer + EOS]
    eos_id = smollm2_tokenizer.convert_tokens_to_ids(EOS)
    assert example.input_ids.count(eos_id) == 3  # default system, user, assistant: template only


def test_truncation_keeps_labels_aligned_with_input_ids(smollm2_tokenizer):
    answer = "one two three four five six seven eight nine ten eleven twelve"
    full = tokenize_conversation([user("Count."), assistant(answer)], smollm2_tokenizer, 512)
    assert full is not None
    cut_at = trained_positions(full)[0] + 4

    example = tokenize_conversation([user("Count."), assistant(answer)], smollm2_tokenizer, cut_at)

    assert example is not None
    assert len(example.input_ids) == len(example.labels) == cut_at
    assert example.input_ids == full.input_ids[:cut_at]
    assert example.labels == full.labels[:cut_at]
    assert trained_spans(example, smollm2_tokenizer) == ["one two three four"]
    assert example.truncated and not full.truncated


def test_truncated_and_dropped_conversations_are_counted_apart(smollm2_tokenizer):
    long_answer = assistant("word " * 80)
    long_question = user("Please consider this question carefully. " * 30)
    conversations = [
        [user("Hi"), assistant("Hello!")],
        [user("Talk."), long_answer],
        [long_question, assistant("Done.")],
    ]

    dataset = tokenize_conversations(conversations, smollm2_tokenizer, max_length=64)

    assert (len(dataset.examples), dataset.truncated, dataset.dropped) == (2, 1, 1)


def test_conversation_cut_off_before_its_answer_is_dropped_and_counted(smollm2_tokenizer):
    long_question = user("Please consider this question carefully. " * 30)
    conversations = [[user("Hi"), assistant("Hello!")], [long_question, assistant("Done.")]]

    dataset = tokenize_conversations(conversations, smollm2_tokenizer, max_length=64)

    assert dataset.dropped == 1
    assert [trained_spans(e, smollm2_tokenizer) for e in dataset.examples] == [["Hello!" + EOS]]


def test_conversation_without_assistant_turn_is_dropped(smollm2_tokenizer):
    dataset = tokenize_conversations([[user("Anyone there?")]], smollm2_tokenizer, 512)

    assert (dataset.examples, dataset.dropped) == ([], 1)


def test_unknown_role_is_rejected_with_its_conversation_and_message_number(smollm2_tokenizer):
    conversations = [
        [user("Hi"), assistant("Hello!")],
        [user("Hi"), {"role": "tool", "content": "{}"}],
    ]

    with pytest.raises(DatasetSchemaError, match=r"Conversation 1: Message 1 needs a role"):
        tokenize_conversations(conversations, smollm2_tokenizer, 512)


@pytest.mark.parametrize("reply", ["\n    return 42", "\n\nSure.", "  indented"])
def test_a_reply_starting_with_whitespace_trains_normally(smollm2_tokenizer, reply):
    # Code data: the reply's first newline merges with the header's "assistant\n" token.
    conversation = [user("Write the body."), assistant(reply), user("Thanks"), assistant("Ok.")]

    example = tokenize_conversation(conversation, smollm2_tokenizer, max_length=512)

    assert example is not None
    first, second = trained_spans(example, smollm2_tokenizer)
    assert first.endswith(reply.lstrip("\n") + EOS) and reply.strip() in first
    assert second == "Ok." + EOS
    rendered = smollm2_tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert example.input_ids == list(rendered)


def test_conversation_opening_with_the_assistant_is_rejected(smollm2_tokenizer):
    with pytest.raises(DatasetSchemaError, match="must not open with an assistant"):
        tokenize_conversation([assistant("Hi!"), user("Hello")], smollm2_tokenizer, 512)


def test_template_that_rewrites_earlier_turns_is_refused(smollm2_tokenizer):
    # Like templates that drop past reasoning: an assistant turn renders differently once a later
    # message follows, so its tokens in the full conversation are not the ones we rendered alone.
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}(earlier){% else %}{{ m.content }}"
        "{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    conversation = [user("a"), assistant("b"), user("c"), assistant("d")]

    with pytest.raises(ConfigError, match="renders the conversation up to message 1 differently"):
        tokenize_conversation(conversation, tokenizer, 512)


def test_tokenizer_without_a_chat_template_is_a_config_error(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = None

    with pytest.raises(ConfigError, match="has no chat template"):
        tokenize_conversation([user("Hi"), assistant("Hello!")], tokenizer, 512)


def test_a_document_trains_every_token_and_the_end_of_sequence_after_it(smollm2_tokenizer):
    text = "Backpropagate trains adapters. <|im_end|> stays text here."
    example = tokenize_document(text, smollm2_tokenizer, max_length=512)

    assert example is not None and example.labels == example.input_ids
    assert example.input_ids[-1] == smollm2_tokenizer.eos_token_id
    assert example.input_ids.count(smollm2_tokenizer.eos_token_id) == 1  # the typed one is text
    assert smollm2_tokenizer.decode(example.input_ids[:-1]) == text


def test_documents_and_conversations_are_cut_and_counted_alike(smollm2_tokenizer):
    long_document = " ".join(["word"] * 100)
    dataset = tokenize_conversations(
        [long_document, "Hi", [user("Hi"), assistant("Hello")]], smollm2_tokenizer, max_length=64
    )

    assert len(dataset.examples[0].input_ids) == 64
    assert (len(dataset.examples), dataset.truncated, dataset.dropped) == (3, 1, 0)


def test_a_row_of_openai_text_parts_trains_as_its_joined_text(smollm2_tokenizer):
    """Dataprep stores text parts joined by newlines: the trainer only sees plain messages."""
    parts = [{"type": "text", "text": "Capital of France?"}, {"type": "text", "text": "One word."}]
    row = {"messages": [{"role": "user", "content": parts}, assistant("Paris.")]}
    [stored] = parse_jsonl([json.dumps(row)], "parts.jsonl").conversations

    example = tokenize_conversation(stored, smollm2_tokenizer, max_length=512)

    assert example is not None
    joined = [user("Capital of France?\nOne word."), assistant("Paris.")]
    assert smollm2_tokenizer.decode(example.input_ids) == smollm2_tokenizer.apply_chat_template(
        joined, tokenize=False
    )
    assert trained_spans(example, smollm2_tokenizer) == ["Paris." + EOS]
