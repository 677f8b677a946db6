"""A dataset in the model's tokens, before training: row lengths, what max_length cuts, and the
first row as trained, checked against the real SmolLM2 tokenizer and template, and through
`backprop data inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli_errors import backprop

from backpropagate_services.trainer.data.templating import tokenize_conversation
from backpropagate_services.trainer.data.token_stats import UNCUT, token_stats


def chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_lengths_are_of_whole_rows_and_max_length_truncates_or_drops_them(smollm2_tokenizer):
    short, long = chat("Hi", "Hello!"), chat("Tell a story.", " ".join(["once"] * 200))
    lengths = [
        len(tokenize_conversation(row, smollm2_tokenizer, UNCUT).input_ids)  # type: ignore[union-attr]
        for row in (short, long)
    ]
    # Cut inside the long row's answer: it still trains on its start.
    stats = token_stats([short, long, "A document of plain text."], smollm2_tokenizer, 64)

    assert stats.rows == 3 and stats.lengths[-1] == max(lengths) > 64
    assert stats.tokens == sum(stats.lengths) and lengths[0] in stats.lengths
    assert (stats.truncated, stats.dropped) == (1, 0)
    assert sum(part.rows for part in stats.histogram) == 3
    assert stats.histogram[0].low == stats.lengths[0] and stats.histogram[-1].high >= max(lengths)
    # The system prompt and the question fill more than 30 tokens: the answer is cut off.
    assert token_stats([long], smollm2_tokenizer, 30).dropped == 1


def test_the_first_row_is_shown_with_what_is_learnt_read_and_cut(smollm2_tokenizer):
    row = chat("What is LoRA?", "Two small matrices beside each frozen weight matrix.")
    whole = token_stats([row], smollm2_tokenizer, 512).sample
    cut = token_stats([row], smollm2_tokenizer, 40).sample

    assert [span.kind for span in whole] == ["context", "trained", "context"]
    assert whole[1].text == "Two small matrices beside each frozen weight matrix.<|im_end|>"
    assert "What is LoRA?" in whole[0].text
    assert cut[-1].kind == "cut" and "".join(span.text for span in cut) == "".join(
        span.text for span in whole
    )


@pytest.mark.model
def test_backprop_data_inspect_prints_token_statistics_and_the_truncated_rows(
    tmp_path: Path, model_cache: Path
):
    path = tmp_path / "long.jsonl"
    rows = [chat(f"Story {n}?", " ".join(["once upon a time"] * (5 + 20 * n))) for n in range(4)]
    path.write_text("".join(json.dumps({"messages": row}) + "\n" for row in rows))
    cache = {"BACKPROPAGATE_MODEL_CACHE": str(model_cache)}

    shown = backprop(tmp_path, "data", "inspect", str(path), "--max-length", "128", env=cache)
    as_json = backprop(
        tmp_path, "data", "inspect", str(path), "--max-length", "128", "--json", env=cache
    )

    assert shown.exit_code == 0, shown.stderr
    assert "max_length 128: 3 rows truncated" in shown.stdout
    assert "first example, as trained" in shown.stdout
    record = json.loads(as_json.stdout)
    tokens = record["tokens"]
    assert (record["num_examples"], tokens["rows"], tokens["truncated"]) == ("4", 4, 3)
    assert tokens["max_length"] == 128 and int(tokens["max_tokens"]) > 128
    assert sum(part["rows"] for part in tokens["histogram"]) == 4
    assert {span["kind"] for span in tokens["sample"]} == {"context", "trained"}
