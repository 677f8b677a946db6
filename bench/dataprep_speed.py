"""Data preparation throughput: a JSONL chat file to training-ready token ids and loss masks,
ours against the naive per-row `datasets.map` a tutorial writes.

- ours: the dataprep parser (format detection, validation) and the trainer's templating
  (`tokenize_conversations`: the chat template, assistant-only labels, max_length), as a run
  prepares its data;
- naive: `datasets.load_dataset("json")` and `.map` of a function over one row at a time that
  renders the chat template twice (the whole conversation, and its prompt for the mask),
  in a fresh cache directory, as the first run of a tutorial script does;
- tokenizer-bound: each template rendered once as text and all of them tokenised in one batch
  call, no validation and no masks: a ceiling for any preparation through this tokenizer.

Rows come from the training benchmark's generator (bench/train_speed.py: a long-tailed mix of
lengths), written in the openai "messages" format. Medians over `--repeats`.

    .venv/bin/python bench/dataprep_speed.py [--rows 10000] [--repeats 3]

Prints rows/s and the ratio; writes bench/results/dataprep_speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import described, speed_flags
from train_speed import conversations

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "dataprep_speed.json"
MAX_LENGTH = 512


def ours(path: Path, tokenizer: Any) -> int:
    from backpropagate_services.dataprep.formats import parse_jsonl
    from backpropagate_services.trainer.data.templating import tokenize_conversations

    with path.open(encoding="utf-8") as lines:
        parsed = parse_jsonl(lines, path.name)
    return len(tokenize_conversations(parsed.conversations, tokenizer, MAX_LENGTH).examples)


def naive(path: Path, tokenizer: Any, cache_dir: Path) -> int:
    from datasets import load_dataset

    from backpropagate_services.trainer.data.templating import IGNORE_INDEX

    def tokenize(row: dict[str, Any]) -> dict[str, list[int]]:
        messages = row["messages"]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        prompt = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        labels = [IGNORE_INDEX] * len(prompt) + list(ids[len(prompt) :])
        return {"input_ids": list(ids)[:MAX_LENGTH], "labels": labels[:MAX_LENGTH]}

    dataset = load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache_dir))
    return len(dataset.map(tokenize, remove_columns=["messages"]))


def tokenizer_bound(path: Path, tokenizer: Any) -> int:
    """The least any preparation can do: render each conversation's template once as text and
    tokenise all of them in one batch call (no validation, no masks, no special-token guard)."""
    with path.open(encoding="utf-8") as lines:
        texts = [
            tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
            for line in lines
        ]
    return len(tokenizer(texts)["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from backpropagate_api.settings import get_settings
    from backpropagate_services.common.atomic import staged
    from backpropagate_services.common.hardware import cpu_name
    from backpropagate_services.common.models import (
        OFFLINE_DEFAULT_ALIAS,
        hf_location,
        resolve_model,
    )

    location = hf_location(resolve_model(OFFLINE_DEFAULT_ALIAS), get_settings().model_cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(location)
    seconds: dict[str, list[float]] = {"naive": [], "ours": [], "tokenizer-bound": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chats.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for messages in conversations(args.rows):
                out.write(json.dumps({"messages": messages}) + "\n")
        for repeat in range(args.repeats):
            started = time.perf_counter()
            kept = naive(path, tokenizer, Path(tmp) / f"cache-{repeat}")
            seconds["naive"].append(time.perf_counter() - started)
            started = time.perf_counter()
            assert ours(path, tokenizer) == kept == args.rows
            seconds["ours"].append(time.perf_counter() - started)
            started = time.perf_counter()
            assert tokenizer_bound(path, tokenizer) == args.rows
            seconds["tokenizer-bound"].append(time.perf_counter() - started)
    print(f"machine: {described()}")
    print(f"{args.rows} chat rows to token ids and masks; medians of {args.repeats}")
    results = []
    naive_rate = args.rows / statistics.median(seconds["naive"])
    for variant, times in seconds.items():
        rate = args.rows / statistics.median(times)
        results.append(
            {
                "variant": variant,
                "seconds": times,
                "rows_per_second": rate,
                "ratio": rate / naive_rate,
            }
        )
        print(f"{variant:15} {rate:9.0f} rows/s {rate / naive_rate:6.2f}x")
    summary = {
        "machine": cpu_name(),
        "cpu_flags": speed_flags(),
        "rows": args.rows,
        "results": results,
    }
    with staged(RESULTS) as partial:
        partial.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
